import NPTCore
import NPTSimulator
import Testing

/// Issue 11's rows that the Swift API shows (the C ABI's are Tests/C/test_robustness.c).
@Suite struct RobustnessTests {
    /// Row 12: a `VirtualMachine` dropped without `destroy()` released nothing: the simulator's VM
    /// and its vCPUs held each other (guest RAM and all). Now the VM's deinit tears the backend down.
    @Test func aDroppedVMReleasesItsBackendAndVCPUs() throws {
        weak var machine: VirtualMachine?
        weak var backendVM: AnyObject?
        weak var backendVCPU: AnyObject?
        do {
            let vm = try makeSimVM(ram: 1 << 20)
            let cpu = try vm.makeVCPU(index: 0)
            _ = try vm.makeVCPU(index: 1)
            machine = vm
            backendVM = vm.backendVM as AnyObject
            backendVCPU = cpu.backend as AnyObject
        }
        #expect(machine == nil)
        #expect(backendVM == nil, "the simulator VM (guest RAM) leaked")
        #expect(backendVCPU == nil, "a simulator vCPU leaked")
    }

    /// Row 2 in the protocol itself: slot numbers past 127 and 255 (they were Int8/UInt8).
    @Test func theProtocolTakesSlotsPast255() {
        var s = PMState(cpus: 300)
        for i in [299, 128, 256] { PMProtocol.apply(.raise(i), to: &s) }
        for i in [299, 128, 256] {
            #expect(PMProtocol.enabled(.queueRequest(i), in: s))
            PMProtocol.apply(.queueRequest(i), to: &s)
        }
        #expect(PMProtocol.enabled(.beginEntry(299), in: s))
        PMProtocol.apply(.beginEntry(299), to: &s)
        #expect(s.holder == 299)
        for j in 0..<300 where j != 299 && PMProtocol.enabled(.acceptStop(j), in: s) { PMProtocol.apply(.acceptStop(j), to: &s) }
        #expect(PMProtocol.enabled(.enter(299), in: s))
        PMProtocol.apply(.enter(299), to: &s)
        PMProtocol.apply(.leave(299), to: &s)
        PMProtocol.apply(.release(299), to: &s)
        #expect(s.queue == [128, 256])
        #expect(PMProtocol.violation(in: s) == nil)
    }

    /// A destroyed VM refuses what reaches the backend; a destroy happens once; a vCPU cannot be
    /// destroyed while a thread drives it, and nothing is destroyed then.
    @Test func destroyIsAllOrNothingAndOnce() throws {
        let vm = try makeSimVM(ram: 1 << 20, budget: 1000)
        let a = try vm.makeVCPU(index: 0)
        _ = try vm.makeVCPU(index: 1)
        try vm.destroy()
        #expect(throws: NPTError.self) { try vm.destroy() }
        #expect((try? vm.makeVCPU(index: 2)) == nil)
        #expect((try? a.registers()) == nil)
        #expect(a.isDestroyed)
        #expect(vm.isDestroyed)
    }
}
