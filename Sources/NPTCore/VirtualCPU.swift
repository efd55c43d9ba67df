import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What the core tells a tool that runs its own loop (`npt_handle_exit`).
package enum ExitAction: UInt32, Sendable {
    /// The core handled the exit (e.g. exposed another hierarchy): run again.
    case resume = 0
    /// No hierarchy permits the access: report the violation to the VM. The exit was rewritten
    /// to `.mbecViolation` with the qualification hardware MBEC would give.
    case reportViolation = 1
    /// Not an MBEC exit (IO, HLT, guest fault, ...): the tool handles it.
    case tool = 2
}

/// A vCPU as the core sees it: which hierarchy it exposes, and the decisions on its exits.
///
/// Decisions (design.md: the core decides, the backend does):
/// - escalation (user -> supervisor): expose the supervisor hierarchy;
/// - return to user (exact mode only; lazy mode does not ask for this exit): expose the user
///   hierarchy;
/// - EPT violation on a fetch: the hierarchy that governs the fetch is the one of the linear
///   address's U/S (exact mode, when the backend reports it) or of the CPL (lazy mode, the patent's
///   rule). If it permits the fetch, expose it and resume; otherwise report the violation;
/// - EPT violation on a data access: R and W are the same in every hierarchy, so no switch can
///   help: report it, unless the policy now permits it (a stale translation: invalidate, resume).
package final class VirtualCPU: @unchecked Sendable {
    package let index: UInt32
    package unowned let vm: VirtualMachine
    package let backend: any BackendVCPU
    // Mutated only by the thread that holds `running`.
    package private(set) var active: HierarchyID = .supervisor
    private var staleRetries = 0
    /// Whether guest paging is on (CR0.PG), as the core last set or restored it. With paging off
    /// every linear address is a user-mode address, so the user hierarchy governs every fetch.
    private var pagingOn = true
    /// The exit controls the backend has now, and the VM's arming epoch they were computed for.
    private var armed: ExitControls = []
    private var armedEpoch: UInt64 = .max
    /// 0 while the thread is outside `backend.run`; else 1 + the arming epoch it entered with (the
    /// VM waits on it before publishing a policy that needs more exits).
    let inRunEpoch = Atomic<UInt64>(0)
    /// This vCPU's index in the privileged-mode protocol.
    var slot = 0

    /// Who uses the vCPU now. One thread drives it (run, registers, ...: `exclusive`); other
    /// threads make short shared uses of its backend (a kick, its counters: `shared`); a destroy
    /// happens once, only while neither is in progress, and after it every use is refused
    /// (`.badHandle`), so the backend's vCPU is never reached after its `destroy`.
    private struct Use { var driven = false; var shared = 0; var state = Lifetime.State.alive }
    private let use = NPTMutex(Use())
    /// Kicks the core sent this vCPU (a `.kicked` exit with none sent is the backend's own).
    private let kicksSent = Atomic<UInt64>(0)
    private var kicksSeen: UInt64 = 0
    private var unaskedKicks = 0
    /// The exit `runRaw` returned last and `handle` has not yet decided (npt_handle_exit accepts
    /// only that one, once).
    private var pendingRaw: VMExit?
    /// `.kicked` exits in a row that the core did not ask for, before `run` gives up with `.backend`.
    package static let maxUnaskedKicks = 10_000

    init(vm: VirtualMachine, index: UInt32, backend: any BackendVCPU) {
        self.vm = vm; self.index = index; self.backend = backend
    }

    /// Whether a thread drives the vCPU now.
    package var isRunning: Bool { use.withLock { $0.driven } }
    /// Whether the vCPU has been destroyed.
    package var isDestroyed: Bool { use.withLock { $0.state == .closed } }

    /// The backend's own counters for this vCPU (npt_vcpu_backend_stats). Any thread, also while
    /// it runs (a shared use); `.badHandle` once the vCPU is destroyed.
    package func backendStatistics() throws(NPTError) -> [BackendStatistic] {
        let index = index
        let r = shared { () -> Result<[BackendStatistic], NPTError> in
            do throws(NPTError) { return .success(try backend.backendStatistics()) } catch { return .failure(error) }
        }
        guard let r else { throw NPTError(.badHandle, "vCPU \(index) is destroyed") }
        return try r.get()
    }

    private func exclusive<T>(_ body: () throws(NPTError) -> T) throws(NPTError) -> T {
        let index = index
        try use.withLock { (u: inout Use) throws(NPTError) in
            switch u.state {
            case .closed: throw NPTError(.badHandle, "vCPU \(index) is destroyed")
            case .closing: throw NPTError(.busy, "vCPU \(index) is being destroyed by another thread")
            case .alive: break
            }
            if u.driven { throw NPTError(.busy, "vCPU \(index) is being driven by another thread") }
            u.driven = true
        }
        defer { use.withLock { $0.driven = false } }
        return try body()
    }

    /// A short use of the backend's vCPU from any thread; nothing (nil) once it is destroyed.
    @discardableResult
    func shared<T>(_ body: () -> T) -> T? {
        let ok = use.withLock { u -> Bool in
            guard u.state == .alive else { return false }
            u.shared += 1
            return true
        }
        guard ok else { return nil }
        defer { use.withLock { $0.shared -= 1 } }
        return body()
    }

    /// Asks a `backend.run` in progress (or the next) to return `.kicked`; nothing once destroyed.
    func kick() {
        shared {
            kicksSent.wrappingAdd(1, ordering: .releasing)
            backend.kick()
        }
    }

    /// Starts this vCPU's destroy: refused (`.busy`) while a thread drives it; waits out shared
    /// uses (each a kick or a counter read). Ends with `finishClose` or `cancelClose`.
    func beginClose() throws(NPTError) {
        let index = index
        var spins = 0
        while true {
            let r: Result<Bool, NPTError> = use.withLock { u in
                switch u.state {
                case .closed: return .failure(NPTError(.badHandle, "vCPU \(index) is destroyed"))
                case .closing: return .failure(NPTError(.busy, "vCPU \(index) is being destroyed by another thread"))
                case .alive: break
                }
                if u.driven { return .failure(NPTError(.busy, "vCPU \(index) is running (or driven by another thread); nothing was destroyed")) }
                if u.shared > 0 { return .success(false) }
                u.state = .closing
                return .success(true)
            }
            if try r.get() { return }
            spins += 1
            if spins > 100_000 { throw NPTError(.busy, "vCPU \(index) is in use by another thread; nothing was destroyed") }
            sched_yield()
        }
    }
    func cancelClose() { use.withLock { $0.state = .alive } }
    func finishClose() { use.withLock { $0.state = .closed } }

    package func registers() throws(NPTError) -> Registers { try exclusive { () throws(NPTError) in try backend.registers() } }

    /// Sets the registers. The core exposes the hierarchy that governs the new state's fetches: the
    /// supervisor one at CPL 0, the user one at CPL 3, the user one with paging off.
    package func setRegisters(_ r: Registers) throws(NPTError) {
        guard r.cpl == 0 || r.cpl == 3 else { throw .invalid("regs.cpl is \(r.cpl); the simulator knows 0 and 3") }
        try exclusive { () throws(NPTError) in
            try backend.setRegisters(r)
            pagingOn = r.cr0 & Registers.cr0PG != 0
            try expose(hierarchy(cpl: r.cpl))
        }
    }

    /// The hierarchy whose execute bit governs fetches at `cpl` (by privilege level, the patent's
    /// rule; with paging off every address is user-mode).
    private func hierarchy(cpl: UInt32) -> HierarchyID {
        !pagingOn ? .user : cpl == 3 ? .user : .supervisor
    }

    package func injectFault(vector: UInt32, errorCode: UInt64, address: UInt64) throws(NPTError) {
        try exclusive { () throws(NPTError) in try backend.injectFault(vector: vector, errorCode: errorCode, address: address) }
    }

    /// The mode runs with paging off: every address is a user-mode address, so the user hierarchy
    /// governs its fetches (SDM: with CR0.PG = 0 every linear address is user-mode).
    func exposeForMode() throws(NPTError) {
        pagingOn = false
        try expose(.user)
    }
    /// After RSM: the hierarchy for the restored state.
    func exposeAfterMode(_ restored: Registers) throws(NPTError) {
        pagingOn = restored.cr0 & Registers.cr0PG != 0
        try expose(hierarchy(cpl: restored.cpl))
    }

    /// Raises the enter-mode interrupt for this vCPU (from any thread).
    /// Refused (`.badHandle`) once the vCPU is destroyed: its protocol slot may belong to another.
    package func raisePrivileged() throws(NPTError) {
        try sharedCall { () throws(NPTError) in try vm.privileged.raise(self) }
    }

    /// The privileged mode as this vCPU's thread sees it (npt_vcpu_privileged_view): a turn of this
    /// vCPU in a recording. From any thread; `.badHandle` once the vCPU is destroyed.
    package func privilegedView() throws(NPTError) -> PrivilegedModeCoordinator.View {
        try sharedCall { () throws(NPTError) in try vm.privileged.view(observer: self) }
    }

    /// `shared` for a call that may fail: `.badHandle` once the vCPU is destroyed.
    private func sharedCall<T>(_ body: () throws(NPTError) -> T) throws(NPTError) -> T {
        let r: Result<T, NPTError>? = shared { () -> Result<T, NPTError> in
            do throws(NPTError) { return .success(try body()) } catch { return .failure(error) }
        }
        guard let r else { throw NPTError(.badHandle, "vCPU \(index) is destroyed") }
        return try r.get()
    }

    /// Another interrupt: delivered now to the guest's fault handler, or after the vCPU resumes if
    /// it is stopped (returns true then).
    @discardableResult
    package func raiseInterrupt(vector: UInt32) throws(NPTError) -> Bool {
        guard let deferred = shared({ vm.privileged.interrupt(self, vector: vector) }) else {
            throw NPTError(.badHandle, "vCPU \(index) is destroyed")
        }
        if deferred { return true }
        try injectFault(vector: vector, errorCode: 0, address: 0)
        return false
    }

    /// Leaves the privileged mode (the RSM analogue), from the VMM.
    package func leavePrivileged() throws(NPTError) {
        try exclusive { () throws(NPTError) in try vm.privileged.leave(self) }
    }

    private func expose(_ h: HierarchyID) throws(NPTError) {
        if h != active {
            try backend.expose(h)
            active = h
            vm.counters.hierarchySwitches.wrappingAdd(1, ordering: .relaxed)
        }
        try syncExitControls(epoch: vm.armEpoch.load(ordering: .acquiring))
    }

    /// The exits this vCPU needs now ("fewer exits without losing security"):
    /// - escalation (exact and lazy) only while the user hierarchy is exposed with paging on and the
    ///   policy has a user-execute-only page: otherwise every page the user hierarchy lets kernel
    ///   code execute is supervisor-executable too, and a supervisor-only page faults into a switch;
    /// - return to user (exact) only while the supervisor hierarchy is exposed with paging on and
    ///   the policy has a supervisor-execute-only page, by the same argument the other way round.
    private func wantedControls() -> ExitControls {
        let needs = vm.exitNeeds.load(ordering: .acquiring)
        var c: ExitControls = []
        guard pagingOn else { return c }
        switch vm.config.mbecMode {
        case .exact:
            if active == .user && needs & VirtualMachine.needsUserOnly != 0 { c.insert(.escalation) }
            if active == .supervisor && needs & VirtualMachine.needsSupervisorOnly != 0 { c.insert(.returnToUser) }
        case .lazy:
            if active == .user && needs & VirtualMachine.needsUserOnly != 0 { c.insert(.escalation) }
        case .violationOnly:
            break
        }
        return c
    }

    private func syncExitControls(epoch: UInt64) throws(NPTError) {
        let want = wantedControls()
        if want != armed || armedEpoch == .max {
            try backend.setExitControls(want)
            armed = want
        }
        armedEpoch = epoch
    }

    /// One `backend.run` with the exit controls the policy needs: if the VM raised its arming epoch
    /// (a policy update that needs more exits is waiting), the controls are synced first; the
    /// update waits until no vCPU is inside `backend.run` with older controls.
    private func runBackend() throws(NPTError) -> VMExit {
        while true {
            let epoch = vm.armEpoch.load(ordering: .acquiring)
            if epoch != armedEpoch { try syncExitControls(epoch: epoch) }
            inRunEpoch.store(epoch &+ 1, ordering: .sequentiallyConsistent)
            if vm.armEpoch.load(ordering: .sequentiallyConsistent) != epoch {
                inRunEpoch.store(0, ordering: .releasing)
                continue
            }
            defer { inRunEpoch.store(0, ordering: .releasing) }
            let x = try backend.run()
            vm.counters.exitsTotal.wrappingAdd(1, ordering: .relaxed)
            return x
        }
    }

    /// Runs until an exit the core does not handle itself.
    package func run() throws(NPTError) -> VMExit {
        try exclusive { () throws(NPTError) in
            defer { vm.privileged.leftGuest(self) }
            pendingRaw = nil
            unaskedKicks = 0
            var repeats = 0
            var last: (reason: VMExit.Reason, rip: UInt64)?
            while true {
                if let x = try vm.privileged.checkpoint(self) { return x }
                var exit = try runBackend()
                if exit.reason == .kicked { try countKick() } else { unaskedKicks = 0 }
                let seen = (exit.reason, exit.rip)
                let action = try decide(&exit)
                try backend.exitDecided(action, exit: exit)
                if action != .resume { return exit }
                // Every other exit the core resumes from moves the guest on: the same one at the same
                // rip again and again is a backend that makes no progress.
                if seen.0 != .kicked, let l = last, l.reason == seen.0, l.rip == seen.1 {
                    repeats += 1
                    if repeats + 1 >= VirtualCPU.maxUnaskedKicks {
                        throw NPTError(.backend, "backend '\(vm.backend.name)' reported exit \(seen.0.rawValue) at rip \(hex(seen.1)) \(repeats + 1) times in a row, each resumed by the core without progress")
                    }
                } else {
                    repeats = 0
                }
                last = seen
            }
        }
    }

    /// A `.kicked` exit: one the core asked for (a kick since the last one), or the backend's own.
    /// A backend that keeps returning `.kicked` unasked would make `run` spin forever: after
    /// `maxUnaskedKicks` in a row it fails with `.backend`.
    private func countKick() throws(NPTError) {
        let sent = kicksSent.load(ordering: .acquiring)
        if sent != kicksSeen { kicksSeen = sent; unaskedKicks = 0; return }
        unaskedKicks += 1
        if unaskedKicks >= VirtualCPU.maxUnaskedKicks {
            unaskedKicks = 0
            throw NPTError(.backend, "backend '\(vm.backend.name)' returned NPT_EXIT_KICKED \(VirtualCPU.maxUnaskedKicks) times in a row without a kick from the core")
        }
    }

    /// Runs until the backend's next exit, whatever it is (the QEMU-style loop).
    package func runRaw() throws(NPTError) -> VMExit {
        try exclusive { () throws(NPTError) in
            defer { vm.privileged.leftGuest(self) }
            pendingRaw = nil
            if let x = try vm.privileged.checkpoint(self) { return x }
            let x = try runBackend()
            pendingRaw = x
            return x
        }
    }

    /// Decides what to do with an exit from `runRaw` and applies it. Only the exit `runRaw`
    /// returned last, once: an exit that did not happen (an escalation out of nowhere, a second
    /// RSM) is refused with `.state` and changes nothing.
    package func handle(_ exit: inout VMExit) throws(NPTError) -> ExitAction {
        try exclusive { () throws(NPTError) in
            guard let p = pendingRaw else {
                throw NPTError(.state, "vCPU \(index) has no exit to decide: npt_handle_exit takes the exit the last npt_vcpu_run_raw returned, once")
            }
            guard p.reason == exit.reason, p.gpa == exit.gpa else {
                throw NPTError(.state, "vCPU \(index): exit reason \(exit.reason.rawValue) at gpa \(hex(exit.gpa.raw)) is not the exit the last npt_vcpu_run_raw returned (reason \(p.reason.rawValue) at \(hex(p.gpa.raw)))")
            }
            pendingRaw = nil
            let action = try decide(&exit)
            try backend.exitDecided(action, exit: exit)
            return action
        }
    }

    private func decide(_ exit: inout VMExit) throws(NPTError) -> ExitAction {
        let c = vm.counters
        if exit.reason != .eptViolation { staleRetries = 0 }
        switch exit.reason {
        case .escalation:
            guard armed.contains(.escalation) else {
                throw NPTError(.backend, "backend '\(vm.backend.name)' reported an escalation exit the core did not arm")
            }
            c.exitsEscalation.wrappingAdd(1, ordering: .relaxed)
            try expose(hierarchy(cpl: 0))
            return .resume
        case .returnToUser:
            guard armed.contains(.returnToUser) else {
                throw NPTError(.backend, "backend '\(vm.backend.name)' reported a return-to-user exit the core did not arm")
            }
            c.exitsReturnToUser.wrappingAdd(1, ordering: .relaxed)
            try expose(hierarchy(cpl: 3))
            return .resume
        case .eptViolation:
            c.exitsEPTViolation.wrappingAdd(1, ordering: .relaxed)
            if vm.persistence.isFlushHintWrite(exit) {
                try vm.guestFlush(self)
                return .resume
            }
            return try violation(&exit)
        case .kicked:
            return .resume
        case .leaveMode:
            if vm.privileged.holds(self) {
                try vm.privileged.leave(self)
                return .resume
            }
            // RSM outside the mode is an invalid opcode.
            if (try? backend.injectFault(vector: 6, errorCode: 0, address: exit.rip)) != nil { return .resume }
            exit.reason = .guestFault
            exit.vector = 6
            exit.qualification = 0
            exit.gva = GVA(exit.rip)   // a #UD reports the faulting instruction's address
            return .tool
        default:
            return .tool
        }
    }

    private func violation(_ exit: inout VMExit) throws(NPTError) -> ExitAction {
        let q = exit.violation
        let policy = vm.policyPermissions(at: exit.gpa)
        let access = q.intersection([.read, .write, .fetch])
        let needed: HierarchyID
        if access.contains(.fetch) {
            if vm.config.mbecMode == .exact && q.contains([.linearValid, .linearTranslation]) {
                needed = .governing(userLinear: q.contains(.userLinear))
            } else {
                needed = hierarchy(cpl: exit.cpl)
            }
        } else {
            needed = active
        }
        let p = policy.projected(onto: needed)
        var permitted = true
        if access.contains(.fetch) && !p.contains(.execute) { permitted = false }
        if access.contains(.read) && !p.contains(.read) { permitted = false }
        if access.contains(.write) && !p.contains(.write) { permitted = false }
        if permitted {
            if needed != active {
                staleRetries = 0
                try expose(needed)
                return .resume
            }
            // The hierarchy already permits it: the backend acted on a stale translation.
            staleRetries += 1
            if staleRetries > 2 {
                staleRetries = 0
                throw NPTError(.backend, "backend '\(vm.backend.name)' keeps reporting a violation at \(exit.gpa) that \(needed) permits")
            }
            try vm.backendVM.invalidate(Invalidation(hierarchy: active, range: GPARange(start: GPA(exit.gpa.raw & ~0xFFF), size: 0x1000)))
            return .resume
        }
        staleRetries = 0
        exit.reason = .mbecViolation
        exit.qualification = ViolationQualification.mbec(
            access: access, policy: policy,
            linear: q.intersection(.linearInformation)).rawValue
        vm.counters.violationsReported.wrappingAdd(1, ordering: .relaxed)
        return .reportViolation
    }
}
