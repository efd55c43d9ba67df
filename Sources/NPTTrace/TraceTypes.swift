// The value types of an NPTKit trace: what a backend reported to the core and what the core
// decided, mirroring the C ABI (include/nptkit.h) field by field. NPTTrace depends on no other
// module of NPTKit, so a plugin (the replay backend) can link it without a second copy of the core.

/// `npt_exit_reason`: the numbers of include/nptkit.h.
package struct TraceExitReason: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    package var rawValue: UInt32
    @inlinable package init(rawValue: UInt32) { self.rawValue = rawValue }
    package static let none = TraceExitReason(rawValue: 0)
    package static let halt = TraceExitReason(rawValue: 1)
    package static let io = TraceExitReason(rawValue: 2)
    package static let mbecViolation = TraceExitReason(rawValue: 3)
    package static let guestFault = TraceExitReason(rawValue: 4)
    package static let budget = TraceExitReason(rawValue: 5)
    package static let escalation = TraceExitReason(rawValue: 6)
    package static let returnToUser = TraceExitReason(rawValue: 7)
    package static let eptViolation = TraceExitReason(rawValue: 8)
    package static let internalError = TraceExitReason(rawValue: 9)
    package static let kicked = TraceExitReason(rawValue: 10)
    package static let leaveMode = TraceExitReason(rawValue: 11)
    package static let privilegedFailed = TraceExitReason(rawValue: 12)

    static let names = ["NONE", "HALT", "IO", "MBEC_VIOLATION", "GUEST_FAULT", "BUDGET", "ESCALATION",
                        "RETURN_TO_USER", "EPT_VIOLATION", "INTERNAL_ERROR", "KICKED", "LEAVE_MODE", "PRIVILEGED_FAILED"]
    /// "EPT_VIOLATION" (the NPT_EXIT_ suffix), or the number for a reason this library does not know.
    package var description: String { rawValue < TraceExitReason.names.count ? TraceExitReason.names[Int(rawValue)] : "reason \(rawValue)" }
}

/// `npt_exit`: one exit as the backend reported it (or as the core rewrote it).
package struct TraceExit: Hashable, Sendable {
    package var reason: TraceExitReason
    package var gpa: UInt64
    package var gva: UInt64
    /// NPT_EPTQ_* for violations; the error code for faults.
    package var qualification: UInt64
    package var vector: UInt32
    package var cpl: UInt32
    /// The hierarchy exposed at the exit (NPT_HIERARCHY_*).
    package var hierarchy: UInt32
    package var ioPort: UInt32
    package var ioValue: UInt64
    package var rip: UInt64

    /// Every field zero (NPT_EXIT_NONE).
    @inlinable
    package init() {
        reason = TraceExitReason(rawValue: 0); gpa = 0; gva = 0; qualification = 0
        vector = 0; cpl = 0; hierarchy = 0; ioPort = 0; ioValue = 0; rip = 0
    }

    @inlinable
    package init(reason: TraceExitReason = .none, gpa: UInt64 = 0, gva: UInt64 = 0, qualification: UInt64 = 0,
                vector: UInt32 = 0, cpl: UInt32 = 0, hierarchy: UInt32 = 0, ioPort: UInt32 = 0, ioValue: UInt64 = 0,
                rip: UInt64 = 0) {
        self.reason = reason; self.gpa = gpa; self.gva = gva; self.qualification = qualification
        self.vector = vector; self.cpl = cpl; self.hierarchy = hierarchy; self.ioPort = ioPort
        self.ioValue = ioValue; self.rip = rip
    }
}

/// `npt_regs`: the registers the core reads (and writes, e.g. entering the privileged mode).
package struct TraceRegs: Hashable, Sendable {
    package var cpl: UInt32 = 0
    package var rip: UInt64 = 0
    package var rflags: UInt64 = 0
    /// rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15 (always 16 entries).
    package var gpr: [UInt64] = Array(repeating: 0, count: 16)
    package var cr0: UInt64 = 0, cr2: UInt64 = 0, cr3: UInt64 = 0, cr4: UInt64 = 0, efer: UInt64 = 0
    package var lstar: UInt64 = 0
    package var faultHandler: UInt64 = 0
    package init() {}

    /// The 26 fields in encoding order (docs/trace-format.md): cpl, rip, rflags, gpr[0..15], cr0, cr2,
    /// cr3, cr4, efer, lstar, fault_handler.
    package static let fieldCount = 26
    func field(_ i: Int) -> UInt64 {
        switch i {
        case 0: return UInt64(cpl)
        case 1: return rip
        case 2: return rflags
        case 3..<19: return gpr[i - 3]
        case 19: return cr0
        case 20: return cr2
        case 21: return cr3
        case 22: return cr4
        case 23: return efer
        case 24: return lstar
        default: return faultHandler
        }
    }
    mutating func setField(_ i: Int, _ v: UInt64) {
        switch i {
        case 0: cpl = UInt32(truncatingIfNeeded: v)
        case 1: rip = v
        case 2: rflags = v
        case 3..<19: gpr[i - 3] = v
        case 19: cr0 = v
        case 20: cr2 = v
        case 21: cr3 = v
        case 22: cr4 = v
        case 23: efer = v
        case 24: lstar = v
        default: faultHandler = v
        }
    }
}

/// `npt_action`: what `npt_handle_exit` told the VMM to do.
package enum TraceAction: UInt8, Hashable, Sendable, CustomStringConvertible {
    case resume = 0, reportViolation = 1, tool = 2
    package var description: String {
        switch self {
        case .resume: return "RESUME"
        case .reportViolation: return "REPORT_VIOLATION"
        case .tool: return "TOOL"
        }
    }
}

/// `npt_vm_config`, as the recording layer saw it.
package struct TraceVMConfig: Hashable, Sendable {
    package var mbecMode: UInt32
    package var ramSize: UInt64
    package var defaultPerms: UInt64
    package var maxStepsPerRun: UInt64
    /// The backend's name ("sim", "kvm", ...).
    package var backend: String
    package init(mbecMode: UInt32 = 0, ramSize: UInt64 = 0, defaultPerms: UInt64 = 0, maxStepsPerRun: UInt64 = 0, backend: String = "") {
        self.mbecMode = mbecMode; self.ramSize = ramSize; self.defaultPerms = defaultPerms
        self.maxStepsPerRun = maxStepsPerRun; self.backend = backend
    }
}

/// One host persistent-memory region as the backend answered `host_pmem_get`.
package struct TraceHostPMemRegion: Hashable, Sendable {
    package var index: UInt32
    package var id: UInt32
    package var base: UInt64
    package var length: UInt64
    package var controllerCount: UInt32
    package var needsWPQFlush: Bool
    /// (controller key, physical flush hint address) per flush target.
    package var targets: [FlushTarget]
    package struct FlushTarget: Hashable, Sendable {
        package var controller: UInt32
        package var address: UInt64
        package init(controller: UInt32, address: UInt64) { self.controller = controller; self.address = address }
    }
    package init(index: UInt32, id: UInt32, base: UInt64, length: UInt64, controllerCount: UInt32, needsWPQFlush: Bool,
                targets: [FlushTarget]) {
        self.index = index; self.id = id; self.base = base; self.length = length
        self.controllerCount = controllerCount; self.needsWPQFlush = needsWPQFlush; self.targets = targets
    }
}

/// A recorded backend's identity (record `backend`): what a replay of its VMs presents.
package struct TraceBackendInfo: Hashable, Sendable {
    package var name: String
    /// NPT_CAP_* bits as the core saw them.
    package var capabilities: UInt64
    /// NPT_GUEST_ISA_* of its vCPUs.
    package var guestISA: UInt32
    /// The ABI version the backend was built for (NPT_ABI_VERSION).
    package var abiVersion: UInt32
    package var description: String
    package init(name: String, capabilities: UInt64, guestISA: UInt32, abiVersion: UInt32, description: String) {
        self.name = name; self.capabilities = capabilities; self.guestISA = guestISA; self.abiVersion = abiVersion
        self.description = description
    }
}

/// One statistic a backend answered (`npt_backend_stat`).
package struct TraceStat: Hashable, Sendable {
    package var name: String
    package var value: UInt64
    package init(name: String, value: UInt64) { self.name = name; self.value = value }
}

/// A step of the privileged (SMM-like) mode protocol.
package enum TracePrivilegedStep: UInt8, Hashable, Sendable, CaseIterable, CustomStringConvertible {
    /// `vcpu` raised the enter-mode interrupt (the core asks every other vCPU to stop).
    case requested = 0
    /// `vcpu` acknowledged the stop (it is parked or outside guest code).
    case stopAcknowledged = 1
    /// The region [gpa, gpa+length) was added to every hierarchy.
    case regionMapped = 2
    /// `vcpu` entered the mode.
    case entered = 3
    /// `vcpu` left the mode (RSM).
    case left = 4
    /// The region was removed and every translation to it invalidated.
    case regionUnmapped = 5
    /// `vcpu` resumed after the mode was left.
    case resumed = 6
    /// The request of `vcpu` failed (a vCPU did not stop in time; `gpa` holds its index).
    case failed = 7
    package var description: String {
        switch self {
        case .requested: return "requested"
        case .stopAcknowledged: return "stop-acknowledged"
        case .regionMapped: return "region-mapped"
        case .entered: return "entered"
        case .left: return "left"
        case .regionUnmapped: return "region-unmapped"
        case .resumed: return "resumed"
        case .failed: return "failed"
        }
    }
}

/// (1.2) Where the core takes the privileged-mode coordinator's monitor (a lock-turn record).
/// The party taking it follows from the site: a raise or an interrupt is made for its vCPU from any
/// thread, a read by the VMM is made for no vCPU, every other site on the vCPU's own thread.
package enum TraceLockSite: UInt8, Hashable, Sendable, CaseIterable, CustomStringConvertible {
    /// npt_vcpu_raise_privileged for the vCPU.
    case raise = 0
    /// Another interrupt for the vCPU (deferred while it is stopped).
    case interrupt = 1
    /// The vCPU's thread before it runs guest code.
    case checkpoint = 2
    /// The vCPU's thread woken in the checkpoint (it was parked: stopped, or waiting for its turn).
    case checkpointWake = 3
    /// The vCPU's thread back from guest code.
    case leftGuest = 4
    /// The entering vCPU's thread again, after it kicked the vCPUs in guest code.
    case entryRelock = 5
    /// The entering vCPU's thread woken while it waits for the others to stop (value: timed out).
    case entryWake = 6
    /// The vCPU leaves the mode (RSM).
    case leave = 7
    /// A read by the VMM (statistics, the holder, the entries, the protocol state).
    case read = 8
    /// A read on the vCPU's own thread (whether it holds the mode, whether every request was served).
    case vcpuRead = 9

    /// The party: 0 the vCPU's thread, 1 a raise for it, 2 an interrupt for it, 3 the VMM.
    package var party: Int {
        switch self {
        case .raise: return 1
        case .interrupt: return 2
        case .read: return 3
        default: return 0
        }
    }
    static let names = ["raise", "interrupt", "checkpoint", "checkpoint-wake", "left-guest", "entry-relock", "entry-wake",
                        "leave", "read", "vcpu-read"]
    package var description: String { TraceLockSite.names[Int(rawValue)] }
}

/// Who caused a record: the backend's answers are the replay's inputs, the core's calls are the
/// decisions a replay compares, the VMM's calls set the scene.
package enum TraceDirection: Sendable {
    case backendToCore, coreToBackend, vmm, trace
}

/// One record of a trace (docs/trace-format.md lists every kind with its number and fields).
package enum TraceRecord: Hashable, Sendable {
    // trace-level
    case meta(key: String, value: String)
    case end(recordCount: UInt64)
    // the VMM's calls (through the C ABI)
    case vmCreate(TraceVMConfig)
    case vmDestroy
    case vcpuCreate(vcpu: UInt32)
    case vcpuDestroy(vcpu: UInt32)
    case policySet(gpa: UInt64, size: UInt64, pageSize: UInt64, perms: UInt64)
    case memoryWrite(gpa: UInt64, data: [UInt8])
    /// (1.1) A memory write recorded by its length and CRC-32C instead of its bytes.
    case memoryDigest(gpa: UInt64, length: UInt64, crc: UInt32)
    /// (1.1) The VMM's `npt_vm_power_failure`.
    case powerFailure
    /// (1.1) Something the VMM measured outside the backend boundary (a wall-clock figure), kept so
    /// that a replay can show the recorded run's value; a replay backend ignores it.
    case note(key: String, values: [UInt64])
    /// (1.1) The records after it concern the trace's VM number `vm` (0: its first vm-create).
    case vmSelect(vm: UInt32)
    /// (1.1) A backend the recording saw: its name, capabilities, guest ISA.
    case backendInfo(TraceBackendInfo)
    // what the backend reported to the core
    case exit(vcpu: UInt32, TraceExit)
    case regsRead(vcpu: UInt32, TraceRegs)
    case memoryRead(gpa: UInt64, data: [UInt8])
    case hostPMemRegion(TraceHostPMemRegion)
    /// The backend answered the call recorded by the last record of kind `kind` with `status` (not NPT_OK).
    case status(kind: UInt8, status: Int32)
    /// (1.1) The backend's statistics (`vm_stats`, or `vcpu_stats` of `vcpu`).
    case backendStats(vcpu: UInt32?, stats: [TraceStat])
    /// (1.1) What `untrapped_flush_hint_writes` answered.
    case untrappedWrites(count: UInt64)
    /// (1.1) What `host_pmem_count` answered (the host-pmem records of each region follow).
    case hostPMemCount(count: UInt32)
    /// (1.1) The call recorded by the last record of kind `kind` (of `vcpu`'s, or the VM's) failed
    /// with `status` and the backend's message.
    case failure(vcpu: UInt32?, kind: UInt8, status: Int32, message: String)
    // the core's decisions (calls into the backend, and its answer to an exit)
    case hierarchy(vcpu: UInt32, hierarchy: UInt32)
    case exitControls(vcpu: UInt32, controls: UInt32)
    case invalidate(hierarchy: UInt32, gpa: UInt64, size: UInt64)
    case injectFault(vcpu: UInt32, vector: UInt32, errorCode: UInt64, address: UInt64)
    case kick(vcpu: UInt32)
    /// The core's answer to an exit: the action and the exit as the core rewrote it (what
    /// `npt_handle_exit` / `npt_vcpu_run` gave the VMM).
    case decision(vcpu: UInt32, action: TraceAction, exit: TraceExit)
    case regsWritten(vcpu: UInt32, TraceRegs)
    case privileged(vcpu: UInt32, step: TracePrivilegedStep, gpa: UInt64, length: UInt64)
    /// (1.1) `vcpu_enter_privileged`: the vCPU enters the mode at `entryRIP`, the region in the view.
    case privilegedEnter(vcpu: UInt32, regionGPA: UInt64, regionSize: UInt64, entryRIP: UInt64)
    /// (1.2) An acquisition of the privileged-mode coordinator's monitor, in the order the monitor
    /// was taken: at `site`, for vCPU `vcpu` (nil: a read of the VMM's), with the outcome the core
    /// saw (`value`: 1 when an entry's wait for the others timed out, else 0).
    case lockTurn(vcpu: UInt32?, site: TraceLockSite, value: UInt64)
    case defineRegion(gpa: UInt64, size: UInt64, hostOffset: UInt64, contents: [UInt8])
    case attachPMem(gpa: UInt64, size: UInt64, region: UInt32, regionOffset: UInt64, hostOffset: UInt64)
    case flushHintPage(gpa: UInt64, hostOffset: UInt64, trapped: Bool)
    case physicalFlush(region: UInt32, controller: UInt32, address: UInt64)
    case fence(vcpu: UInt32)
    case trappedWriteCompleted(vcpu: UInt32)

    /// The record kind byte (docs/trace-format.md).
    package var kind: UInt8 {
        switch self {
        case .meta: return RecordKind.meta
        case .end: return RecordKind.end
        case .vmCreate: return RecordKind.vmCreate
        case .vmDestroy: return RecordKind.vmDestroy
        case .vcpuCreate: return RecordKind.vcpuCreate
        case .vcpuDestroy: return RecordKind.vcpuDestroy
        case .policySet: return RecordKind.policySet
        case .memoryWrite: return RecordKind.memoryWrite
        case .exit: return RecordKind.exit
        case .regsRead: return RecordKind.regsRead
        case .memoryRead: return RecordKind.memoryRead
        case .hostPMemRegion: return RecordKind.hostPMemRegion
        case .status: return RecordKind.status
        case .hierarchy: return RecordKind.hierarchy
        case .exitControls: return RecordKind.exitControls
        case .invalidate: return RecordKind.invalidate
        case .injectFault: return RecordKind.injectFault
        case .kick: return RecordKind.kick
        case .decision: return RecordKind.decision
        case .regsWritten: return RecordKind.regsWritten
        case .privileged: return RecordKind.privileged
        case .defineRegion: return RecordKind.defineRegion
        case .attachPMem: return RecordKind.attachPMem
        case .flushHintPage: return RecordKind.flushHintPage
        case .physicalFlush: return RecordKind.physicalFlush
        case .fence: return RecordKind.fence
        case .trappedWriteCompleted: return RecordKind.trappedWriteCompleted
        case .memoryDigest: return RecordKind.memoryDigest
        case .powerFailure: return RecordKind.powerFailure
        case .note: return RecordKind.note
        case .vmSelect: return RecordKind.vmSelect
        case .backendInfo: return RecordKind.backendInfo
        case .backendStats: return RecordKind.backendStats
        case .untrappedWrites: return RecordKind.untrappedWrites
        case .hostPMemCount: return RecordKind.hostPMemCount
        case .failure: return RecordKind.failure
        case .privilegedEnter: return RecordKind.privilegedEnter
        case .lockTurn: return RecordKind.lockTurn
        }
    }

    package var direction: TraceDirection {
        switch self {
        case .meta, .end, .vmSelect, .backendInfo: return .trace
        case .vmCreate, .vmDestroy, .vcpuCreate, .vcpuDestroy, .policySet, .memoryWrite, .memoryDigest, .powerFailure, .note:
            return .vmm
        case .exit, .regsRead, .memoryRead, .hostPMemRegion, .status, .backendStats, .untrappedWrites, .hostPMemCount, .failure:
            return .backendToCore
        default: return .coreToBackend
        }
    }

    /// A decision of the core a replay compares with what the core decides again.
    package var isDecision: Bool { direction == .coreToBackend }

    /// The vCPU the record is about, if it is about one.
    package var vcpu: UInt32? {
        switch self {
        case .vcpuCreate(let v), .vcpuDestroy(let v), .exit(let v, _), .regsRead(let v, _), .hierarchy(let v, _),
             .exitControls(let v, _), .injectFault(let v, _, _, _), .kick(let v), .decision(let v, _, _),
             .regsWritten(let v, _), .privileged(let v, _, _, _), .fence(let v), .trappedWriteCompleted(let v),
             .privilegedEnter(let v, _, _, _):
            return v
        case .backendStats(let v, _), .failure(let v, _, _, _):
            return v
        default:
            return nil
        }
    }
}

/// Record kind numbers (docs/trace-format.md, "Record kinds").
/// The records of a vCPU's exit path, for `TraceWriter.appendExitPath` (the recording layer's hot
/// path); each raw value is its `RecordKind` number.
package enum ExitPathRecord: UInt8, Sendable, CaseIterable {
    case exit = 0x10, hierarchy = 0x20, exitControls = 0x21, decision = 0x25
}

package enum RecordKind {
    package static let meta: UInt8 = 0x01
    package static let vmCreate: UInt8 = 0x02
    package static let vmDestroy: UInt8 = 0x03
    package static let vcpuCreate: UInt8 = 0x04
    package static let vcpuDestroy: UInt8 = 0x05
    package static let policySet: UInt8 = 0x06
    package static let memoryWrite: UInt8 = 0x07
    package static let exit: UInt8 = 0x10
    package static let regsRead: UInt8 = 0x11
    package static let memoryRead: UInt8 = 0x12
    package static let hostPMemRegion: UInt8 = 0x13
    package static let status: UInt8 = 0x14
    package static let hierarchy: UInt8 = 0x20
    package static let exitControls: UInt8 = 0x21
    package static let invalidate: UInt8 = 0x22
    package static let injectFault: UInt8 = 0x23
    package static let kick: UInt8 = 0x24
    package static let decision: UInt8 = 0x25
    package static let regsWritten: UInt8 = 0x26
    package static let privileged: UInt8 = 0x30
    package static let defineRegion: UInt8 = 0x31
    package static let attachPMem: UInt8 = 0x40
    package static let flushHintPage: UInt8 = 0x41
    package static let physicalFlush: UInt8 = 0x42
    package static let fence: UInt8 = 0x43
    package static let trappedWriteCompleted: UInt8 = 0x44
    // 1.1
    package static let vmSelect: UInt8 = 0x08
    package static let memoryDigest: UInt8 = 0x09
    package static let powerFailure: UInt8 = 0x0A
    package static let note: UInt8 = 0x0B
    package static let backendInfo: UInt8 = 0x0C
    package static let backendStats: UInt8 = 0x15
    package static let untrappedWrites: UInt8 = 0x16
    package static let hostPMemCount: UInt8 = 0x17
    package static let failure: UInt8 = 0x18
    package static let privilegedEnter: UInt8 = 0x32
    // 1.2
    package static let lockTurn: UInt8 = 0x33
    // 1.3, only in a trace with the header flag TraceFormat.compactExitPaths: one vCPU's exit,
    // hierarchy, exit controls and decision in one record (the reader returns the four).
    package static let exitPath: UInt8 = 0x27
    package static let end: UInt8 = 0x7F
    /// Whether this version reads records of `kind` (a reader skips others: a newer minor's).
    @inline(__always) package static func isKnown(_ kind: UInt8) -> Bool {
        switch kind {
        case 0x01...0x0C, 0x10...0x18, 0x20...0x27, 0x30...0x33, 0x40...0x44, 0x7F: return true
        default: return false
        }
    }
    /// Every kind this version reads; a reader skips others (a newer minor's).
    package static let known: Set<UInt8> = [meta, vmCreate, vmDestroy, vcpuCreate, vcpuDestroy, policySet, memoryWrite,
                                           exit, regsRead, memoryRead, hostPMemRegion, status, hierarchy, exitControls,
                                           invalidate, injectFault, kick, decision, regsWritten, privileged, defineRegion,
                                           attachPMem, flushHintPage, physicalFlush, fence, trappedWriteCompleted, end,
                                           vmSelect, memoryDigest, powerFailure, note, backendInfo, backendStats, untrappedWrites,
                                           hostPMemCount, failure, privilegedEnter, lockTurn, exitPath]
}

/// A record with where it is: its number (0-based, skipped unknown kinds included), its byte
/// offset in the trace and its timestamp in nanoseconds.
package struct TraceEvent: Hashable, Sendable {
    package var index: UInt64
    package var offset: UInt64
    package var timestamp: UInt64
    package var record: TraceRecord
    package init(index: UInt64, offset: UInt64, timestamp: UInt64, record: TraceRecord) {
        self.index = index; self.offset = offset; self.timestamp = timestamp; self.record = record
    }
}
