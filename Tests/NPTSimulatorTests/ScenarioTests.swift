import MBECReference
import NPTCore
import NPTDifferential
import NPTScenarios
import NPTSimulator
import Synchronization
import Testing
import NPTHost

@Suite struct HVCIScenarioTests {
    func check(_ o: HVCIScenario.Outcome, syscalls: Int) throws {
        #expect(o.printed == (1...UInt64(syscalls)).map { $0 })
        #expect(o.halted)
        #expect(o.attacksSucceeded == 0, "an attack ran guest code")
        try #require(o.violations.count == 2)
        let user = o.violations[0], kernel = o.violations[1]
        // Attack 1: user fetch of a supervisor-execute-only page at a user-mode address.
        #expect(user.gva.raw == HVCISim.driverUserAliasVA)
        #expect(user.gpa.raw == HVCISim.driver)
        #expect(user.cpl == 3)
        #expect(user.violation.isSuperset(of: [.fetch, .readable, .executable, .linearValid, .linearTranslation, .userLinear]))
        #expect(!user.violation.contains(.userExecutable))
        #expect(!user.violation.contains(.writable))
        // Attack 2: kernel fetch of a user-execute-only page through a supervisor-mode alias.
        #expect(kernel.gva.raw == HVCISim.jitKernelAliasVA)
        #expect(kernel.gpa.raw == HVCISim.userJIT)
        #expect(kernel.cpl == 0)
        #expect(kernel.violation.isSuperset(of: [.fetch, .readable, .writable, .userExecutable]))
        #expect(!kernel.violation.contains(.executable))
        #expect(!kernel.violation.contains(.userLinear))
        // The guest kernel's handler saw both as #VE at the faulting addresses.
        #expect(o.faultsSeenByGuest.map(\.vector) == [20, 20])
        #expect(o.faultsSeenByGuest.map(\.rip) == [HVCISim.driverUserAliasVA, HVCISim.jitKernelAliasVA])
    }

    @Test(arguments: [VMConfig.MBECMode.exact, .lazy])
    func stopsBothAttacks(mode: VMConfig.MBECMode) throws {
        let vm = try makeSimVM(ram: HVCISim.ram, mode: mode)
        let o = try HVCIScenario(syscalls: 10).run(on: vm)
        try check(o, syscalls: 10)
        let s = vm.statistics()
        #expect(s.violationsReported == 2)
        // 10 writes + 2 other system calls + 1 fault from user mode = 13 escalations.
        #expect(s.exitsEscalation == 13)
        if mode == .exact {
            #expect(s.exitsReturnToUser == 13) // boot IRET, 10 SYSRETs, 2 IRETs of the fault handler
            #expect(s.exitsEPTViolation == 2)
        } else {
            #expect(s.exitsReturnToUser == 0)
            #expect(s.exitsEPTViolation > 2)
        }
    }

    @Test(arguments: [VMConfig.MBECMode.exact, .lazy])
    func twoExitsPerSystemCallRoundTrip(mode: VMConfig.MBECMode) throws {
        func exits(_ n: Int) throws -> UInt64 {
            let vm = try makeSimVM(ram: HVCISim.ram, mode: mode)
            _ = try HVCIScenario(syscalls: n).run(on: vm)
            let s = vm.statistics()
            return s.exitsEscalation + s.exitsReturnToUser + s.exitsEPTViolation
        }
        #expect(try exits(60) - exits(10) == 100)
    }

    /// The QEMU-style loop (raw exits, the tool asks the core) gives the same outcome as the
    /// library's loop.
    @Test func rawLoopMatchesLibraryLoop() throws {
        let vm = try makeSimVM(ram: HVCISim.ram)
        let s = HVCIScenario(syscalls: 5)
        let image = try HVCIScenario.image(for: .simulator)
        try vm.setPolicy(image.policy.map(\.range))
        try image.memory.load(into: vm)
        let cpu = try vm.makeVCPU(index: 0)
        try cpu.setRegisters(s.bootRegisters(image))
        var printed: [UInt64] = [], violations: [VMExit] = [], actions: [VMExit.Reason: Int] = [:]
        loop: for _ in 0..<10_000 {
            var x = try cpu.runRaw()
            let reason = x.reason
            switch try cpu.handle(&x) {
            case .resume:
                actions[reason, default: 0] += 1
            case .reportViolation:
                violations.append(x)
                try cpu.injectFault(vector: 20, errorCode: x.qualification, address: x.gva.raw)
            case .tool:
                if x.reason == .halt { break loop }
                if x.reason == .io && x.ioPort == HVCIScenario.Port.print { printed.append(x.ioValue) }
            }
        }
        let reference = try HVCIScenario(syscalls: 5).run(on: try makeSimVM(ram: HVCISim.ram))
        #expect(printed == reference.printed)
        #expect(violations == reference.violations)
        #expect(actions[.escalation] == 8 && actions[.returnToUser] == 8)
    }
}

/// Each documented difference between the emulation and hardware MBEC, on purpose, next to the
/// reference model's answer.
@Suite struct DocumentedGapTests {
    static let user: UInt64 = 0x40_0000, kernel: UInt64 = 0xFFFF_8000_0000_0000

    struct Setup {
        var image = GuestImage()
        var regs = Registers()
        var policy: [PolicyRange] = []
        var table: [UInt64: EPTPermissions] = [:]
    }

    /// A kernel page at `kernel`, and a page at a user-mode address `user + 0x1000` holding `OUT 9`
    /// whose policy is `target`. The kernel returns to user mode straight into that page (SYSRET),
    /// or, with `kernelJumps`, jumps there itself.
    func build(target: EPTPermissions, smep: Bool, kernelJumps: Bool) throws -> Setup {
        var s = Setup()
        var pt = GuestPageTableBuilder(image: &s.image, tableArea: GPARange(start: GPA(0), size: 0x10000))
        try pt.map(&s.image, gva: Self.kernel, gpa: 0x10_0000, flags: [.present])
        try pt.map(&s.image, gva: Self.user + 0x1000, gpa: 0x20_0000, flags: [.present, .user])
        var k = Assembler(origin: Self.kernel)
        k.load64(1, Self.user + 0x1000)
        k.emit(kernelJumps ? .jmpr : .sysret, 1)
        s.image.write(0x10_0000, k.bytes)
        var t = Assembler(origin: Self.user + 0x1000)
        t.out(0, port: 9)
        s.image.write(0x20_0000, t.bytes)
        s.policy = [PolicyRange(start: GPA(0x10_0000), size: 0x1000, pageSize: .size4K, permissions: [.read, .supervisorExecute]),
                    PolicyRange(start: GPA(0x20_0000), size: 0x1000, pageSize: .size4K, permissions: target)]
        s.table = [0x100: [.read, .supervisorExecute], 0x200: target]
        s.regs.cr0 = Registers.cr0PG; s.regs.cr3 = pt.cr3; s.regs.efer = Registers.eferNXE
        s.regs.cr4 = smep ? Registers.cr4SMEP : 0
        s.regs.rip = Self.kernel
        return s
    }

    /// Runs the emulation and the reference until the fetch at the target page; returns both outcomes.
    func outcomes(_ s: Setup, mode: VMConfig.MBECMode) throws -> (emulation: VMExit, reference: ReferenceOutcome) {
        let vm = try makeSimVM(ram: 4 << 20, mode: mode)
        try vm.setPolicy(s.policy)
        try s.image.load(into: vm)
        let cpu = try vm.makeVCPU(index: 0)
        try cpu.setRegisters(s.regs)
        let x = try cpu.run()
        let table = s.table
        var mem = ReferenceMemory()
        for (frame, bytes) in s.image.pages { mem.load(frame << 12, bytes: bytes) }
        var ref = ReferenceMBEC(cpu: ReferenceCPU(s.regs), memory: mem,
                                policy: { g in g >= 4 << 20 ? 0 : (table[g >> 12] ?? [.read, .write]).rawValue })
        var o = ReferenceOutcome.stepped
        for _ in 0..<10 { o = ref.step(); if o != .stepped { break } }
        return (x, o)
    }

    @Test func supervisorOnlyPageAtUserAddressRightAfterReturn() throws {
        let s = try build(target: [.read, .supervisorExecute], smep: true, kernelJumps: false)
        let exact = try outcomes(s, mode: .exact)
        // Hardware MBEC: a user-mode address is governed by Xu, which is clear.
        #expect(exact.reference.fetchViolation?.user == true)
        #expect(exact.emulation.reason == .mbecViolation)
        #expect(ReferenceOutcome(exact.emulation) == exact.reference)
        // Lazy mode: the supervisor hierarchy is still exposed, so the page runs (documented gap).
        let lazy = try outcomes(s, mode: .lazy)
        #expect(lazy.emulation.reason == .io && lazy.emulation.ioPort == 9)
    }

    @Test func smepOffKernelRunsUserExecutablePageAtUserAddress() throws {
        // Hardware MBEC allows it (Xu governs a user-mode address); the exact emulation agrees by
        // switching to the user hierarchy on the violation (it knows the address's U/S).
        let s = try build(target: [.read, .userExecute], smep: false, kernelJumps: true)
        let exact = try outcomes(s, mode: .exact)
        #expect(exact.reference == .io(port: 9, value: 0))
        #expect(exact.emulation.reason == .io && exact.emulation.ioPort == 9)
        // Lazy mode decides by CPL and reports it (documented gap, SMEP off).
        let lazy = try outcomes(s, mode: .lazy)
        #expect(lazy.emulation.reason == .mbecViolation)
    }

    @Test func smepOffKernelRunsSupervisorOnlyPageAtUserAddress() throws {
        // Hardware MBEC refuses (Xu is clear); the supervisor hierarchy has X: documented gap.
        let s = try build(target: [.read, .supervisorExecute], smep: false, kernelJumps: true)
        let exact = try outcomes(s, mode: .exact)
        #expect(exact.reference.fetchViolation?.user == true)
        #expect(exact.emulation.reason == .io && exact.emulation.ioPort == 9)
    }

    @Test func smepOnKernelCannotReachUserAddressAtAll() throws {
        let s = try build(target: [.read, .userExecute], smep: true, kernelJumps: true)
        let exact = try outcomes(s, mode: .exact)
        #expect(exact.emulation.reason == .guestFault && exact.emulation.vector == 14)
        #expect(ReferenceOutcome(exact.emulation) == exact.reference)
    }
}

@Suite struct RunningVCPUTests {
    /// A policy change while a vCPU runs on another thread takes effect at an instruction boundary:
    /// the loop's page loses execute permission and the vCPU stops with a violation on it.
    @Test func policyChangeWhileRunning() throws {
        let vm = try makeSimVM(ram: 4 << 20, mode: .exact)
        var img = GuestImage()
        var pt = GuestPageTableBuilder(image: &img, tableArea: GPARange(start: GPA(0), size: 0x10000))
        try pt.map(&img, gva: 0xFFFF_8000_0000_0000, gpa: 0x10_0000, flags: [.present])
        var a = Assembler(origin: 0xFFFF_8000_0000_0000)
        let loop = a.here
        a.emit(.addi, 0, 0, 1)
        a.jmp(to: loop)
        img.write(0x10_0000, a.bytes)
        try vm.setPolicy(PolicyRange(start: GPA(0x10_0000), size: 0x1000, pageSize: .size4K, permissions: [.read, .supervisorExecute]))
        try img.load(into: vm)
        let cpu = try vm.makeVCPU(index: 0)
        var r = Registers()
        r.cr0 = Registers.cr0PG; r.cr3 = pt.cr3; r.rip = 0xFFFF_8000_0000_0000
        try cpu.setRegisters(r)
        // The vCPU runs on its own thread (never on Swift's cooperative pool: it blocks).
        let result = Mutex<VMExit?>(nil)
        let runner = HostThread { let x = try? cpu.run(); result.withLock { $0 = x } }
        while !cpu.isRunning { sleepNanos(100_000) }
        // Let it loop a little, then revoke execute.
        sleepNanos(5_000_000)
        try vm.setPolicy(PolicyRange(start: GPA(0x10_0000), size: 0x1000, pageSize: .size4K, permissions: [.read]))
        runner.join()
        let x = try #require(result.withLock { $0 })
        #expect(x.reason == .mbecViolation)
        #expect(x.gpa.raw & ~0xFFF == 0x10_0000)
        #expect(x.violation.contains(.fetch) && !x.violation.contains(.executable))
        // Busy while running, usable after.
        #expect(try cpu.registers().gpr[0] > 0)
    }

    @Test func budgetAndBadInput() throws {
        let vm = try makeSimVM(ram: 1 << 20, budget: 5)
        let cpu = try vm.makeVCPU(index: 0)
        var r = Registers()
        r.rip = 0x1000 // paging off: NOPs (zero bytes), supervisor addresses
        try vm.setPolicy(PolicyRange(start: GPA(0), size: 1 << 20, pageSize: .size4K, permissions: .all))
        try cpu.setRegisters(r)
        let x = try cpu.run()
        #expect(x.reason == .budget)
        #expect(try cpu.registers().rip == 0x1000 + 5 * 8)
        r.cpl = 2
        #expect(throws: NPTError.self) { try cpu.setRegisters(r) }
        #expect(throws: NPTError.self) { try cpu.injectFault(vector: 14, errorCode: 0, address: 0) } // no handler
        #expect(throws: NPTError.self) { try vm.makeVCPU(index: 0) }
    }
}
