import NPTTrace

/// The mechanism side. A backend exposes hierarchies to vCPUs, configures exits, runs guest code and
/// reports exits; it never decides policy (design.md section 1).

package struct BackendCapabilities: OptionSet, Hashable, Sendable {
    package var rawValue: UInt64
    package init(rawValue: UInt64) { self.rawValue = rawValue }
    /// Can expose a chosen hierarchy to each vCPU.
    package static let mbecEmulation = BackendCapabilities(rawValue: 1 << 0)
    /// Exits on a user-to-supervisor transition.
    package static let exitOnEscalation = BackendCapabilities(rawValue: 1 << 1)
    /// Exits on a supervisor-to-user transition.
    package static let exitOnReturn = BackendCapabilities(rawValue: 1 << 2)
    /// A violation exit says whether the linear address was a user-mode address.
    package static let linearModeInfo = BackendCapabilities(rawValue: 1 << 3)
    /// Runs guest code.
    package static let run = BackendCapabilities(rawValue: 1 << 4)
    /// Can stop vCPUs (kick) and back a privileged-mode region.
    package static let privilegedMode = BackendCapabilities(rawValue: 1 << 5)
    /// Backs NVDIMM ranges with host persistent memory, traps writes to a write-protected page,
    /// and writes physical flush hints.
    package static let persistentMemory = BackendCapabilities(rawValue: 1 << 6)
}

extension BackendCapabilities {
    /// The C names of the bits, for messages.
    package var names: [String] {
        let all: [(BackendCapabilities, String)] = [
            (.mbecEmulation, "NPT_CAP_MBEC_EMULATION"), (.exitOnEscalation, "NPT_CAP_EXIT_ON_ESCALATE (an exit on every user-to-supervisor transition)"),
            (.exitOnReturn, "NPT_CAP_EXIT_ON_RETURN (an exit on every supervisor-to-user transition)"),
            (.linearModeInfo, "NPT_CAP_LINEAR_MODE_INFO (the U/S of the linear address in a violation)"),
            (.run, "NPT_CAP_RUN"), (.privilegedMode, "NPT_CAP_PRIVILEGED_MODE"), (.persistentMemory, "NPT_CAP_PERSISTENT_MEMORY")]
        return all.filter { contains($0.0) }.map(\.1)
    }
    /// Short names of the bits (NPT_CAP_ without the prefix), for tables.
    package var shortNames: [String] {
        names.map { String($0.split(separator: " ").first ?? "").replacingPrefix("NPT_CAP_") }
    }
    /// Every bit the ABI defines.
    package static let defined: BackendCapabilities = [.mbecEmulation, .exitOnEscalation, .exitOnReturn, .linearModeInfo, .run,
                                                      .privilegedMode, .persistentMemory]
}

package struct ExitControls: OptionSet, Hashable, Sendable {
    package var rawValue: UInt32
    package init(rawValue: UInt32) { self.rawValue = rawValue }
    package static let escalation = ExitControls(rawValue: 1 << 0)
    package static let returnToUser = ExitControls(rawValue: 1 << 1)
}

/// Register state (mirrors `npt_regs`).
package struct Registers: Equatable, Sendable {
    package var cpl: UInt32 = 0
    package var rip: UInt64 = 0
    package var rflags: UInt64 = 2
    package var gpr = [UInt64](repeating: 0, count: 16)
    package var cr0: UInt64 = 0
    package var cr2: UInt64 = 0
    package var cr3: UInt64 = 0
    package var cr4: UInt64 = 0
    package var efer: UInt64 = 0
    package var lstar: UInt64 = 0
    package var faultHandler: UInt64 = 0
    package init() {}

    package static let cr0PG: UInt64 = 1 << 31
    package static let cr0WP: UInt64 = 1 << 16
    package static let rflagsAC: UInt64 = 1 << 18
    package static let cr4SMEP: UInt64 = 1 << 20
    package static let cr4SMAP: UInt64 = 1 << 21
    package static let eferNXE: UInt64 = 1 << 11
}

/// EPT-violation exit qualification (Intel SDM, "Exit Qualification for EPT Violations").
package struct ViolationQualification: OptionSet, Hashable, Sendable {
    package var rawValue: UInt64
    package init(rawValue: UInt64) { self.rawValue = rawValue }
    package static let read = ViolationQualification(rawValue: 1 << 0)
    package static let write = ViolationQualification(rawValue: 1 << 1)
    package static let fetch = ViolationQualification(rawValue: 1 << 2)
    package static let readable = ViolationQualification(rawValue: 1 << 3)
    package static let writable = ViolationQualification(rawValue: 1 << 4)
    package static let executable = ViolationQualification(rawValue: 1 << 5)
    package static let userExecutable = ViolationQualification(rawValue: 1 << 6)
    package static let linearValid = ViolationQualification(rawValue: 1 << 7)
    package static let linearTranslation = ViolationQualification(rawValue: 1 << 8)
    package static let userLinear = ViolationQualification(rawValue: 1 << 9)
    /// Bit 10 (advanced VM-exit information, with bit 8): guest paging maps the linear address writable.
    package static let linearWritable = ViolationQualification(rawValue: 1 << 10)
    /// Bit 11 (advanced VM-exit information, with bit 8): guest paging maps it execute-disable.
    package static let linearExecuteDisable = ViolationQualification(rawValue: 1 << 11)
    /// The bits a backend reports about the linear address (7-11), which the core keeps as they are.
    package static let linearInformation: ViolationQualification = [.linearValid, .linearTranslation, .userLinear,
                                                                   .linearWritable, .linearExecuteDisable]

    /// The qualification hardware MBEC would report for `access` to a page with `policy`.
    package static func mbec(access: ViolationQualification, policy: EPTPermissions,
                            linear: ViolationQualification) -> ViolationQualification {
        var q = access.intersection([.read, .write, .fetch]).union(linear)
        if policy.contains(.read) { q.insert(.readable) }
        if policy.contains(.write) { q.insert(.writable) }
        if policy.contains(.supervisorExecute) { q.insert(.executable) }
        if policy.contains(.userExecute) { q.insert(.userExecutable) }
        return q
    }
}

/// Exits (mirrors `npt_exit`).
package struct VMExit: Equatable, Sendable, CustomStringConvertible {
    package enum Reason: UInt32, Sendable {
        case none = 0, halt = 1, io = 2, mbecViolation = 3, guestFault = 4, budget = 5
        case escalation = 6, returnToUser = 7, eptViolation = 8, internalError = 9
        /// The core asked the vCPU to leave `run` (to stop it, or to deliver an enter-mode request).
        case kicked = 10
        /// The guest executed RSM: leave the privileged mode (the core handles it).
        case leaveMode = 11
        /// An enter-mode request failed: a CPU did not stop within the bound (`vector` = its index).
        case privilegedEntryFailed = 12
    }
    package var reason: Reason
    package var gpa: GPA = GPA(0)
    package var gva: GVA = GVA(0)
    package var qualification: UInt64 = 0
    package var vector: UInt32 = 0
    package var cpl: UInt32 = 0
    package var hierarchy: HierarchyID = .supervisor
    package var ioPort: UInt32 = 0
    package var ioValue: UInt64 = 0
    package var rip: UInt64 = 0
    package init(reason: Reason) { self.reason = reason }

    package var violation: ViolationQualification { ViolationQualification(rawValue: qualification) }

    package var description: String {
        switch reason {
        case .io: "io port \(ioPort) value \(ioValue)"
        case .mbecViolation, .eptViolation:
            "\(reason) \(gpa) \(gva) q=\(hex(qualification)) cpl \(cpl) in \(hierarchy)"
        case .guestFault: "guest fault vector \(vector) error \(hex(qualification)) at \(gva) rip \(hex(rip))"
        default: "\(reason) rip \(hex(rip))"
        }
    }
}

/// What the core offers a backend about the VM it serves.
package protocol HierarchyProvider: AnyObject, Sendable {
    /// The current hierarchies (an immutable snapshot).
    func currentSnapshot() -> ShadowSnapshot
    /// The generation of the current snapshot, cheap to read on every instruction: a backend that
    /// keeps a snapshot compares it to see that the core published another (translations added
    /// need no invalidation, but a kept snapshot would not have them).
    var publishedGeneration: UInt64 { get }
}

package struct VMConfig: Sendable {
    /// How the core emulates MBEC, and so what it guarantees (README, "What each mode guarantees").
    package enum MBECMode: UInt32, Sendable, CaseIterable, CustomStringConvertible {
        /// Exit on every user-to-supervisor and supervisor-to-user transition that needs a switch;
        /// a violation picks the hierarchy by the linear address's U/S. Identical to hardware MBEC
        /// for a guest with CR4.SMEP = 1.
        case exact = 0
        /// The patent's minimum: exit on escalation only; the supervisor hierarchy stays exposed
        /// after a return to user mode until a violation switches (the CPL decides).
        case lazy = 1
        /// No privilege-change exit at all: the hierarchy changes only on a fetch violation (the
        /// CPL decides). A weaker, named guarantee for backends without an escalation exit: kernel
        /// code entered straight from user mode may run user-execute-only pages until it fetches a
        /// page the user hierarchy does not make executable (the ret2dir-through-the-IDT attack
        /// runs), and user code right after a return may run supervisor-execute-only pages.
        case violationOnly = 2

        package var description: String {
            switch self { case .exact: "exact"; case .lazy: "lazy"; case .violationOnly: "violation-only" }
        }

        /// What the mode needs from the backend to keep its guarantee.
        package var requiredCapabilities: BackendCapabilities {
            switch self {
            case .exact: [.mbecEmulation, .exitOnEscalation, .exitOnReturn, .linearModeInfo]
            case .lazy: [.mbecEmulation, .exitOnEscalation]
            case .violationOnly: [.mbecEmulation]
            }
        }

        /// Why a backend with `caps` cannot run this mode (nil: it can).
        package func refusal(backend: String, capabilities caps: BackendCapabilities, summary: String? = nil) -> NPTError? {
            let missing = requiredCapabilities.subtracting(caps)
            guard !missing.isEmpty else { return nil }
            let names = missing.names.joined(separator: ", ")
            let weaker = VMConfig.MBECMode.allCases.filter { $0.requiredCapabilities.isSubset(of: caps) }
            let hint = weaker.isEmpty ? "no MBEC mode is possible on it"
                : "modes it can keep: \(weaker.map(\.description).joined(separator: ", "))"
            var m = "MBEC mode \(self) needs \(names), which backend '\(backend)' lacks; \(hint)"
            if let summary { m += " (backend '\(backend)': \(summary))" }
            return NPTError(.guarantee, m)
        }
    }
    package var ramSize: UInt64
    package var defaultPermissions: EPTPermissions
    package var mbecMode: MBECMode
    package var maxStepsPerRun: UInt64
    package var backendName: String?
    /// Records every call between the core and the backend of this VM into a trace (Recording.swift;
    /// `npt_vm_config.record_path`, the CLI's `--record`). nil: no recording.
    package var recorder: TraceRecorder?
    package init(ramSize: UInt64, defaultPermissions: EPTPermissions = [.read, .write],
                mbecMode: MBECMode = .exact, maxStepsPerRun: UInt64 = 0, backendName: String? = nil) {
        self.ramSize = ramSize; self.defaultPermissions = defaultPermissions
        self.mbecMode = mbecMode; self.maxStepsPerRun = maxStepsPerRun; self.backendName = backendName
    }
}

/// The instruction set a backend's vCPUs execute: which guest image a scenario or a VMM loads
/// (NPT_GUEST_ISA_*).
package enum GuestISA: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    /// Not said (a backend table older than ABI 1.3).
    case unknown = 0
    /// The simulator's ISA (docs/guest-isa.md).
    case simulator = 1
    case x86_64 = 2
    /// Runs no guest code (trace replay).
    case none = 3
    package var description: String {
        switch self {
        case .unknown: "unknown"
        case .simulator: "simulator"
        case .x86_64: "x86-64"
        case .none: "none"
        }
    }
}

package protocol Backend: AnyObject, Sendable {
    var name: String { get }
    var summary: String { get }
    var capabilities: BackendCapabilities { get }
    var guestISA: GuestISA { get }
    var abiVersion: UInt32 { get }
    var isPlugin: Bool { get }
    func makeVM(config: VMConfig, hierarchies: any HierarchyProvider, handle: UnsafeMutableRawPointer?) throws(NPTError) -> any BackendVM
    /// Host discovery: the host's persistent-memory regions, whether they need WPQ flushing, and
    /// where their physical flush hints are.
    func hostPersistence() throws(NPTError) -> HostPersistence
}

extension Backend {
    package var abiVersion: UInt32 { NPTABI.version }
    package var isPlugin: Bool { false }
    package func hostPersistence() throws(NPTError) -> HostPersistence {
        throw .unsupported("backend '\(name)' has no persistent memory")
    }
}

package protocol BackendVM: AnyObject, Sendable {
    func writeMemory(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(NPTError)
    func readMemory(_ gpa: GPA, _ into: UnsafeMutableRawBufferPointer) throws(NPTError)
    /// INVEPT analogue: translations of `range` in `hierarchy` may have changed.
    func invalidate(_ inv: Invalidation) throws(NPTError)
    func makeVCPU(index: UInt32) throws(NPTError) -> any BackendVCPU
    /// Backs the privileged-mode region: `contents` at `hostOffset` of the backing memory, where the
    /// shadow hierarchies' leaves for the region point.
    func defineRegion(_ range: GPARange, hostOffset: UInt64, contents: UnsafeRawBufferPointer) throws(NPTError)
    /// Told right before the region is added to the view (`holder` set) and right after it was
    /// removed and every translation to it invalidated (nil). A backend may check with it that no
    /// other CPU runs meanwhile.
    func regionVisibility(holder: UInt32?)
    /// The host's persistent memory as this VM sees it, where that is fixed per VM (the simulator:
    /// the platform the VM was created on, which a later `SimulatorBackend.setPlatform` does not
    /// change); nil: the backend's `hostPersistence()` answers.
    var hostPersistence: HostPersistence? { get }
    /// Backs guest-physical `range` with host persistent memory: `regionOffset` bytes into host
    /// region `region` (a `HostPersistence.Region.id`). The hierarchies' leaves for the range point
    /// at `hostOffset` of the backing memory. If a later step of adding the range fails, the core
    /// forgets it without telling the backend (it never maps it); a later attach at the same GPA
    /// replaces it.
    func attachPersistentMemory(_ range: GPARange, region: UInt32, regionOffset: UInt64, hostOffset: UInt64) throws(NPTError)
    /// The virtual flush hint page: the hierarchies map `gpa` to `hostOffset` (a scratch page),
    /// read-only when `trapped` (a write exits as an EPT violation), read-write otherwise.
    func defineFlushHintPage(_ gpa: GPA, hostOffset: UInt64, trapped: Bool) throws(NPTError)
    /// Writes one physical flush hint: the controller drains its write-pending queue to the media.
    func physicalFlush(region: UInt32, target: HostPersistence.FlushTarget) throws(NPTError)
    /// Guest writes to the virtual flush hint that cost no exit, where the backend can count them.
    var untrappedFlushHintWrites: UInt64 { get }
    /// A power failure of the host's persistent memory: afterwards the VM's NVDIMM ranges hold
    /// what reached the media (where the backend can model one).
    func powerFailure() throws(NPTError)
    /// The backend's own counters for this VM (exits by its own reasons, memslot changes...),
    /// by stable names; [] where it keeps none.
    func backendStatistics() throws(NPTError) -> [BackendStatistic]
    /// (ABI 1.5) Whether the privileged-mode coordinator's monitor acquisitions of this VM go through
    /// `lockTurn` (docs/replay-privileged-mode.md): `.none` for a backend that runs guest code (the
    /// coordinator then pays one check), `.record` under the recording layer, `.replay` where the
    /// backend orders them (the trace replay backend: npt_backend_ops.vm_lock_turn).
    var lockTurns: LockTurnMode { get }
    /// One acquisition of the monitor, at `site` for vCPU `vcpu` (nil: the VMM). `.wait`: before the
    /// core takes it (a replay waits until the acquisition's record is next). `.taken`: the monitor is
    /// held (the recording layer writes the record; a replay consumes it and answers the recorded
    /// value, `LockTurnRetry` when another thread of the same party took it). `value`: the outcome
    /// the core saw (an entry's timed-out wait); the answer is the one to use.
    func lockTurn(_ site: TraceLockSite, vcpu: UInt32?, phase: LockTurnPhase, value: UInt64) throws(NPTError) -> UInt64
    func destroy()
}

/// How a VM's privileged-mode monitor acquisitions are ordered (BackendVM.lockTurns).
package enum LockTurnMode: Sendable { case none, record, replay }
/// The two calls of one acquisition: before it (outside the monitor), and once the monitor is held.
package enum LockTurnPhase: UInt32, Sendable { case wait = 0, taken = 1 }

/// One counter a backend keeps itself (npt_backend_stat).
package struct BackendStatistic: Sendable, Equatable, CustomStringConvertible {
    package var name: String
    package var value: UInt64
    package init(name: String, value: UInt64) { self.name = name; self.value = value }
    package var description: String { "\(name)=\(value)" }

    /// Names the core itself reads, where a backend keeps them: a vCPU's "instructions" (retired),
    /// "tlb_hits", "tlb_misses" (summed into `VMStatistics`), a VM's "outside_while_visible"
    /// (instructions a vCPU outside the privileged mode ran while the region was visible: the
    /// invariant keeps it 0).
    package static let instructions = "instructions", tlbHits = "tlb_hits", tlbMisses = "tlb_misses"
    package static let outsideWhileVisible = "outside_while_visible"
}

extension Array where Element == BackendStatistic {
    /// The value of statistic `name`, nil where the backend does not keep it.
    package func value(_ name: String) -> UInt64? { first { $0.name == name }?.value }
}

/// A privileged-mode entry as the core tells it to the backend (npt_privileged_entry): the core
/// has stopped every other vCPU and added the region to the view.
package struct PrivilegedEntry: Sendable, Equatable {
    package var vcpuIndex: UInt32
    package var region: GPARange
    /// `region.start` + the region's entry offset.
    package var entryRIP: UInt64
    package init(vcpuIndex: UInt32, region: GPARange, entryRIP: UInt64) {
        self.vcpuIndex = vcpuIndex; self.region = region; self.entryRIP = entryRIP
    }

    /// The mode's entry state from the interrupted one (SMM's: CPL 0, paging off, at the entry
    /// point, the vCPU's index in gpr[0]), as the core writes it with `setRegisters` for a backend
    /// that has no entry of its own.
    package func entryState(from interrupted: Registers) -> Registers {
        var e = interrupted
        e.cpl = 0
        e.cr0 = 0
        e.rip = entryRIP
        e.gpr[0] = UInt64(vcpuIndex)
        return e
    }
}

extension BackendVM {
    package var lockTurns: LockTurnMode { .none }
    package func lockTurn(_ site: TraceLockSite, vcpu: UInt32?, phase: LockTurnPhase, value: UInt64) throws(NPTError) -> UInt64 { value }
    package func defineRegion(_ range: GPARange, hostOffset: UInt64, contents: UnsafeRawBufferPointer) throws(NPTError) {
        throw .unsupported("this backend cannot back a privileged-mode region")
    }
    package func regionVisibility(holder: UInt32?) {}
    package var hostPersistence: HostPersistence? { nil }
    package func attachPersistentMemory(_ range: GPARange, region: UInt32, regionOffset: UInt64, hostOffset: UInt64) throws(NPTError) {
        throw .unsupported("this backend cannot back NVDIMM ranges")
    }
    package func defineFlushHintPage(_ gpa: GPA, hostOffset: UInt64, trapped: Bool) throws(NPTError) {
        throw .unsupported("this backend cannot map a virtual flush hint")
    }
    package func physicalFlush(region: UInt32, target: HostPersistence.FlushTarget) throws(NPTError) {
        throw .unsupported("this backend cannot write a physical flush hint")
    }
    package var untrappedFlushHintWrites: UInt64 { 0 }
    package func powerFailure() throws(NPTError) { throw .unsupported("this backend cannot model a power failure") }
    package func backendStatistics() throws(NPTError) -> [BackendStatistic] { [] }
}

/// A vCPU of a backend. Driven by one thread at a time (the core enforces it).
package protocol BackendVCPU: AnyObject, Sendable {
    func registers() throws(NPTError) -> Registers
    func setRegisters(_ r: Registers) throws(NPTError)
    func expose(_ h: HierarchyID) throws(NPTError)
    func setExitControls(_ c: ExitControls) throws(NPTError)
    func run() throws(NPTError) -> VMExit
    func injectFault(vector: UInt32, errorCode: UInt64, address: UInt64) throws(NPTError)
    /// Makes a `run` in progress (or the next one) return `.kicked` soon; callable from any thread.
    func kick()
    /// Makes every earlier store and cache-line write-back of this vCPU reach the memory
    /// controllers (what SFENCE guarantees), before the core writes a physical flush hint for it.
    func fence() throws(NPTError)
    /// Completes the guest instruction whose write to a write-protected page exited, once the core
    /// has emulated it (the write itself is dropped).
    func completeTrappedWrite() throws(NPTError)
    /// The core has decided that this vCPU enters the privileged mode now (the others are stopped,
    /// the region is in the view): save what the backend needs to restore the interrupted state
    /// exactly, and put the vCPU in the mode's entry state (`entry.entryState(from: interrupted)`,
    /// in the backend's own terms). The default writes that state with `setRegisters`.
    func enterPrivileged(_ entry: PrivilegedEntry, interrupted: Registers) throws(NPTError)
    /// The vCPU leaves the mode (its RSM, or an entry undone): restore what `enterPrivileged`
    /// saved. The core then writes the registers it saved. The default does nothing.
    func leavePrivileged() throws(NPTError)
    /// The backend's own counters for this vCPU; [] where it keeps none.
    func backendStatistics() throws(NPTError) -> [BackendStatistic]
    /// The core's answer to an exit of this vCPU (its run loop, or `handle` for a tool's own loop):
    /// the action and the exit as rewritten for the VMM. Told so that a recording can keep it and a
    /// replay can compare it; a throw fails the call that decided. Default: nothing (BackendHooks.swift).
    func exitDecided(_ action: ExitAction, exit: VMExit) throws(NPTError)
    func destroy()
}

extension BackendVCPU {
    package func fence() throws(NPTError) { throw .unsupported("this backend cannot fence a vCPU's stores") }
    package func completeTrappedWrite() throws(NPTError) { throw .unsupported("this backend cannot complete a trapped write") }
    package func enterPrivileged(_ entry: PrivilegedEntry, interrupted: Registers) throws(NPTError) {
        try setRegisters(entry.entryState(from: interrupted))
    }
    package func leavePrivileged() throws(NPTError) {}
    package func backendStatistics() throws(NPTError) -> [BackendStatistic] { [] }
}

package enum NPTABI {
    package static let major: UInt32 = 1
    /// 1.1: virtualized NVDIMM WPQ flushing; 1.2: MBEC guarantees per mode, qualification bits
    /// 10-11, policies on NVDIMM ranges, guest NVDIMM SSDT, host NVDIMM discovery from sysfs;
    /// 1.3: guest ISAs, plugin interface 2 (arguments, error channel, privileged enter/leave,
    /// backend statistics); 1.4: recording, the core's answer to each exit told to the backend;
    /// 1.5: the privileged-mode coordinator's lock turns told to a backend that orders them;
    /// 1.6: npt_vcpu_privileged_view (a vCPU thread's own view of the privileged mode).
    package static let minor: UInt32 = 6
    package static let version: UInt32 = (major << 16) | minor
    package static func major(of v: UInt32) -> UInt32 { v >> 16 }
}

extension String {
    func replacingPrefix(_ p: String) -> String { hasPrefix(p) ? String(dropFirst(p.count)) : self }
}
