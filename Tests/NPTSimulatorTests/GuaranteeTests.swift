@testable import NPTCore
import NPTScenarios
import NPTSimulator
import Synchronization
import Testing
import NPTHost

/// Issue 9: what each mode guarantees on which backend, and the holes found in the MBEC emulation.
@Suite struct GuaranteeTests {
    func registry(withoutExits: BackendCapabilities = []) throws(NPTError) -> BackendRegistry {
        let reg = BackendRegistry()
        try reg.register(SimulatorBackend(name: "sim", withoutExits: withoutExits), makeDefault: true)
        return reg
    }

    func vm(_ mode: VMConfig.MBECMode, withoutExits: BackendCapabilities = [], ram: UInt64 = HVCISim.ram) throws(NPTError) -> VirtualMachine {
        try VirtualMachine(config: VMConfig(ramSize: ram, mbecMode: mode), registry: registry(withoutExits: withoutExits))
    }

    func code(_ body: () throws(NPTError) -> Void) -> NPTError.Code? {
        do throws(NPTError) { try body(); return nil } catch { return error.code }
    }

    /// A mode the backend cannot keep is refused up front, naming the missing capability.
    @Test func modesAreRefusedWhereTheBackendCannotKeepThem() throws {
        let noEscalation: BackendCapabilities = [.exitOnEscalation, .exitOnReturn]
        for mode in [VMConfig.MBECMode.exact, .lazy] {
            do throws(NPTError) {
                _ = try vm(mode, withoutExits: noEscalation)
                Issue.record("mode \(mode) accepted on a backend without escalation exits")
            } catch {
                #expect(error.code == .guarantee)
                #expect(error.message.contains("NPT_CAP_EXIT_ON_ESCALATE"), "\(error.message)")
                #expect(error.message.contains("violation-only"), "\(error.message)")
            }
        }
        #expect(code { () throws(NPTError) in _ = try vm(.violationOnly, withoutExits: noEscalation) } == nil)
        // Without return exits: lazy yes, exact no (it needs them).
        #expect(code { () throws(NPTError) in _ = try vm(.exact, withoutExits: .exitOnReturn) } == .guarantee)
        #expect(code { () throws(NPTError) in _ = try vm(.lazy, withoutExits: .exitOnReturn) } == nil)
        // Without linear-address information exact mode cannot pick by U/S.
        #expect(code { () throws(NPTError) in _ = try vm(.exact, withoutExits: .linearModeInfo) } == .guarantee)
        // The full simulator keeps every mode.
        for m in VMConfig.MBECMode.allCases { #expect(code { () throws(NPTError) in _ = try vm(m) } == nil) }
    }

    /// Finding 1: the kernel entered straight at a supervisor alias of a user-execute-only page.
    /// Stopped in exact and lazy modes (the escalation exit exposes the supervisor hierarchy first);
    /// violation-only mode, the weaker named guarantee, lets it run, as documented.
    @Test(arguments: [VMConfig.MBECMode.exact, .lazy, .violationOnly])
    func ret2dirThroughTheEntry(mode: VMConfig.MBECMode) throws {
        let withoutExits: BackendCapabilities = mode == .violationOnly ? [.exitOnEscalation, .exitOnReturn] : []
        let outcome = try EntryAttackScenario().run(on: vm(mode, withoutExits: withoutExits))
        switch (mode, outcome) {
        case (.exact, .stopped(let x)), (.lazy, .stopped(let x)):
            #expect(x.cpl == 0)
            #expect(x.gva.raw == HVCISim.syscallVA)
            #expect(x.gpa.raw == HVCISim.userJIT)
            #expect(x.violation.isSuperset(of: [.fetch, .readable, .writable, .userExecutable, .linearTranslation]))
            #expect(!x.violation.contains(.executable) && !x.violation.contains(.userLinear))
        case (.violationOnly, .ran(let cpl, _, let h)):
            #expect(cpl == 0 && h == .user)
        default:
            Issue.record("mode \(mode): \(outcome)")
        }
    }

    /// The same attack on a simulator without escalation exits but in lazy mode is impossible: the
    /// VM is refused (the guarantee would not hold).
    @Test func theAttackCannotRunInAModeThatPromisesToStopIt() throws {
        #expect(code { () throws(NPTError) in _ = try vm(.lazy, withoutExits: .exitOnEscalation) } == .guarantee)
    }

    /// Finding 2: a vCPU created while a policy revokes a page must not keep the old policy. The
    /// simulator's hook pauses creation exactly between the new vCPU reading the hierarchies and
    /// being listed for invalidations; the revocation runs in that window.
    @Test func aVCPUCreatedDuringARevocationSeesIt() throws {
        let reg = BackendRegistry()
        let sim = SimulatorBackend()
        try reg.register(sim, makeDefault: true)
        let vm = try VirtualMachine(config: VMConfig(ramSize: 1 << 20, defaultPermissions: .all, mbecMode: .exact), registry: reg)
        let page: UInt64 = 0x8000
        var loop = Assembler(origin: page)
        loop.out(0, port: 1)
        loop.jmp(to: page)
        try vm.writeMemory(GPA(page), bytes: loop.bytes)
        let simVM = try #require(vm.backendVM as? SimVM)
        let paused = Atomic<Int>(0)
        simVM.testHookBeforeListing = {
            paused.store(1, ordering: .releasing)
            while paused.load(ordering: .acquiring) == 1 { sleepNanos(100_000) }
        }
        let created = Mutex<VirtualCPU?>(nil)
        let t = HostThread { let v = try? vm.makeVCPU(index: 1); created.withLock { $0 = v } }
        while paused.load(ordering: .acquiring) == 0 { sleepNanos(100_000) }
        // In the window: revoke execute (policy R only).
        try vm.setPolicy(PolicyRange(start: GPA(page), size: 0x1000, pageSize: .size4K, permissions: .read))
        simVM.testHookBeforeListing = nil
        paused.store(2, ordering: .releasing)
        t.join()
        let v1 = try #require(created.withLock { $0 })
        var r = Registers()
        r.rip = page   // paging off: linear = guest-physical
        try v1.setRegisters(r)
        let x = try v1.run()
        #expect(x.reason == .mbecViolation, "the new vCPU ran the revoked page: \(x)")
        #expect(x.gpa.raw == page && x.violation.contains(.fetch))
    }

    /// Finding 4: NVDIMM ranges carry policies like RAM (npt_policy_set used to refuse them).
    @Test func nvdimmRangesCarryPolicies() throws {
        let vm = try vm(.exact, ram: 1 << 20)
        let base: UInt64 = 0x4000_0000
        _ = try vm.addNVDIMM(gpa: GPA(base), size: 0x4000, hostRegion: 1, regionOffset: 0)
        #expect(try vm.permissions(at: GPA(base)) == [.read, .write])   // the default permissions
        // Paging off: every address is user-mode, so Xu governs. R|Xs on the first page: no fetch.
        try vm.setPolicy(PolicyRange(start: GPA(base), size: 0x1000, pageSize: .size4K, permissions: [.read, .supervisorExecute]))
        try vm.setPolicy(PolicyRange(start: GPA(base + 0x1000), size: 0x1000, pageSize: .size4K, permissions: [.read, .userExecute]))
        #expect(try vm.permissions(at: GPA(base)) == [.read, .supervisorExecute])
        #expect(vm.snapshot.translate(GPA(base), in: .supervisor).permissions == [.read, .execute])
        #expect(vm.snapshot.translate(GPA(base), in: .user).permissions == [.read])
        // A range crossing the NVDIMM range's end, or its alignment, is refused and changes nothing.
        #expect(code { () throws(NPTError) in try vm.setPolicy(PolicyRange(start: GPA(base + 0x3000), size: 0x2000, pageSize: .size4K, permissions: .all)) } == .outOfRange)
        #expect(code { () throws(NPTError) in try vm.setPolicy(PolicyRange(start: GPA(base + 0x800), size: 0x1000, pageSize: .size4K, permissions: .all)) } == .misaligned)
        #expect(try vm.permissions(at: GPA(base + 0x3000)) == [.read, .write])
        // The guest: a jump into the R|Xs page is refused, the R|Xu page runs.
        var loop = Assembler(origin: 0x1000)
        loop.jump(to: base + 0x1000, via: 1)
        try vm.writeMemory(GPA(0x1000), bytes: loop.bytes)
        try vm.setPolicy(PolicyRange(start: GPA(0x1000), size: 0x1000, pageSize: .size4K, permissions: [.read, .userExecute]))
        let cpu = try vm.makeVCPU(index: 0)
        var r = Registers()
        r.rip = 0x1000
        try cpu.setRegisters(r)
        // The R|Xu page holds zeros (NOPs): it runs through to the next page (R|W): refused there.
        let x = try cpu.run()
        #expect(x.reason == .mbecViolation && x.gpa.raw == base + 0x2000 && x.violation.contains(.fetch), "\(x)")
        // A jump to the R|Xs page: refused at once (Xu governs with paging off).
        var r2 = Registers()
        r2.rip = base
        try cpu.setRegisters(r2)
        let y = try cpu.run()
        #expect(y.reason == .mbecViolation && y.gpa.raw == base && y.violation.contains([.fetch, .executable, .userLinear]), "\(y)")
    }

    /// Finding 5: destroyed vCPUs leave the privileged-mode coordinator (their slots are reused).
    @Test func destroyedVCPUsDoNotLeakCoordinatorSlots() throws {
        let vm = try vm(.exact, ram: 1 << 20)
        try vm.defineRegion(start: GPA(0x10_0000), size: 0x1000, contents: Assembler.encode(.rsm))
        let keep = try vm.makeVCPU(index: 0)
        for i in 1...1000 {
            let v = try vm.makeVCPU(index: UInt32(i))
            try vm.removeVCPU(v)
        }
        #expect(vm.privileged.slotCounts.used == 1)
        #expect(vm.privileged.slotCounts.free == 1)
        _ = keep
    }

    /// A vCPU created while another holds the privileged mode starts stopped: no vCPU outside the
    /// mode may run while the region is visible.
    @Test func aVCPUCreatedDuringTheModeWaitsForItsEnd() throws {
        let vm = try VirtualMachine(config: VMConfig(ramSize: 1 << 20, mbecMode: .exact, maxStepsPerRun: 1000), registry: registry())
        // The region's handler spins (the holder stays in the mode until the VMM makes it leave).
        var h = Assembler(origin: 0x10_0000)
        h.jmp(to: 0x10_0000)
        try vm.defineRegion(start: GPA(0x10_0000), size: 0x1000, contents: h.bytes)
        try vm.setPolicy(PolicyRange(start: GPA(0), size: 1 << 20, pageSize: .size4K, permissions: .all))
        var loop = Assembler(origin: 0x2000)
        loop.out(0, port: 1)
        loop.jmp(to: 0x2000)
        try vm.writeMemory(GPA(0x2000), bytes: loop.bytes)
        let holder = try vm.makeVCPU(index: 0)
        var r = Registers()
        r.rip = 0x2000
        try holder.setRegisters(r)
        try holder.raisePrivileged()
        // The holder's thread enters the mode and spins in the handler (budget exits return).
        let entered = Atomic<Bool>(false)
        let stopHolder = Atomic<Bool>(false)
        let t = HostThread {
            while !stopHolder.load(ordering: .acquiring) {
                _ = try? holder.run()
                if vm.privileged.holder == 0 { entered.store(true, ordering: .releasing) }
            }
        }
        while !entered.load(ordering: .acquiring) { sleepNanos(100_000) }
        let late = try vm.makeVCPU(index: 1)
        try late.setRegisters(r)
        // It must not run guest code while the region is visible: its run parks until the mode
        // ends. Make the holder leave from another thread after a while.
        let ran = Atomic<Bool>(false)
        let lateThread = HostThread { if let x = try? late.run(), x.reason == .io { ran.store(true, ordering: .releasing) } }
        sleepNanos(50_000_000)
        let ranDuringMode = ran.load(ordering: .acquiring)
        #expect(!ranDuringMode, "a vCPU created during the mode ran while the region was visible")
        #expect(try vm.backendStatistics().value(BackendStatistic.outsideWhileVisible) == 0)
        stopHolder.store(true, ordering: .releasing)
        t.join()
        try holder.leavePrivileged()
        lateThread.join()
        let ranAfter = ran.load(ordering: .acquiring)
        #expect(ranAfter, "the late vCPU never ran after the mode ended")
    }
}

/// "Fewer exits without losing security": exits are armed only while the policy needs them.
@Suite struct ExitArmingTests {
    func exitsPerCall(_ mode: VMConfig.MBECMode, policy: (inout [PolicyRange]) -> Void) throws -> (escalation: Double, ret: Double, violation: Double, printed: Int) {
        func run(_ n: Int) throws -> (VMStatistics, HVCIScenario.Outcome) {
            let vm = try makeSimVM(ram: HVCISim.ram, mode: mode)
            let s = HVCIScenario(syscalls: n)
            var p = try HVCIScenario.image(for: .simulator).policy.map(\.range)
            policy(&p)
            let o = try s.run(on: vm, policy: p)
            return (vm.statistics(), o)
        }
        let (a, _) = try run(10), (b, o) = try run(60)
        return (Double(b.exitsEscalation - a.exitsEscalation) / 50, Double(b.exitsReturnToUser - a.exitsReturnToUser) / 50,
                Double(b.exitsEPTViolation - a.exitsEPTViolation) / 50, o.printed.count)
    }

    static let noSupervisorOnly: @Sendable (inout [PolicyRange]) -> Void = { p in
        for i in p.indices where p[i].permissions.contains(.supervisorExecute) { p[i].permissions.insert(.userExecute) }
    }
    static let noUserOnly: @Sendable (inout [PolicyRange]) -> Void = { p in
        for i in p.indices where p[i].permissions.contains(.userExecute) { p[i].permissions.insert(.supervisorExecute) }
    }

    @Test func exitsPerSystemCallFollowThePolicyShape() throws {
        // HVCI-like (both classes): exact mode takes an escalation and a return exit per call.
        let hvci = try exitsPerCall(.exact) { _ in }
        #expect(hvci.escalation == 1 && hvci.ret == 1 && hvci.violation == 0)
        // No supervisor-only page: no return exit is armed; the user code's first fetch after the
        // return (its page is user-only) switches by a violation instead.
        let e1 = try exitsPerCall(.exact, policy: Self.noSupervisorOnly)
        #expect(e1.escalation == 1 && e1.ret == 0 && e1.violation == 1, "\(e1)")
        #expect(e1.printed == 60)
        // No user-only page: no escalation exit is armed; the kernel's first fetch switches.
        let e2 = try exitsPerCall(.exact, policy: Self.noUserOnly)
        #expect(e2.escalation == 0 && e2.ret == 1 && e2.violation == 1, "\(e2)")
        #expect(e2.printed == 60)
        // Lazy mode without user-only pages: the supervisor hierarchy serves both levels, no exit.
        let l = try exitsPerCall(.lazy, policy: Self.noUserOnly)
        #expect(l.escalation == 0 && l.ret == 0 && l.violation == 0, "\(l)")
        // Lazy HVCI-like: an escalation and a violation per call.
        let lh = try exitsPerCall(.lazy) { _ in }
        #expect(lh.escalation == 1 && lh.ret == 0 && lh.violation == 1, "\(lh)")
    }

    /// A policy update that adds the first user-execute-only page while a vCPU runs in the user
    /// hierarchy arms its escalation exit before the policy is published: the vCPU spins at CPL 3
    /// (no user-only page yet, so no escalation exit armed) until the test, after `setPolicy`
    /// returned, lets it make the system call into the attacker's alias. It must be stopped.
    @Test func addingTheFirstUserOnlyPageArmsTheEscalationExitFirst() throws {
        let vm = try makeSimVM(ram: HVCISim.ram, mode: .lazy)
        let image = try HVCIScenario.image(for: .simulator)
        var img = image.attackedMemory
        var regs = image.boot
        regs.cpl = 3
        regs.rip = HVCISim.userCodeVA
        // The user process waits for a flag in its data page, then makes the system call.
        var u = Assembler(origin: HVCISim.userCodeVA)
        u.load64(2, HVCISim.userDataVA)
        let wait = u.here
        u.emit(.load, 0, 2, 0)
        u.jz(0, to: wait)
        u.emit(.syscall)
        img.write(HVCISim.userCode, u.bytes)
        var before = image.policy.map(\.range)
        for i in before.indices where before[i].permissions.contains(.userExecute) { before[i].permissions.insert(.supervisorExecute) }
        try vm.setPolicy(before)
        #expect(vm.exitNeeds.load(ordering: .relaxed) & VirtualMachine.needsUserOnly == 0)
        try img.load(into: vm)
        let cpu = try vm.makeVCPU(index: 0)
        try cpu.setRegisters(regs)
        let outcome = Mutex<EntryAttackScenario.Outcome?>(nil)
        let t = HostThread { let o = try? EntryAttackScenario.finish(cpu); outcome.withLock { $0 = o } }
        while !cpu.isRunning { sleepNanos(100_000) }
        sleepNanos(2_000_000)
        try vm.setPolicy(image.policy.map(\.range))     // JIT and user code become user-execute only
        try vm.writeMemory(GPA(HVCISim.userData), bytes: [1, 0, 0, 0, 0, 0, 0, 0])
        t.join()
        let o = try #require(outcome.withLock { $0 })
        guard case .stopped(let x) = o else { Issue.record("the attack ran: \(o)"); return }
        #expect(x.cpl == 0 && x.gva.raw == HVCISim.syscallVA)
        #expect(vm.statistics().exitsEscalation >= 1)
    }
}
