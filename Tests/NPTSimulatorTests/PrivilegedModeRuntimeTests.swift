import NPTCore
import NPTScenarios
import NPTSimulator
import Synchronization
import Testing
import NPTHost

@Suite(.serialized) struct PrivilegedModeRuntimeTests {
    func vm(budget: UInt64 = 2000) throws -> VirtualMachine {
        try makeSimVM(ram: PrivilegedSim.ram, perms: [.read, .write], budget: budget)
    }

    func checkInvariant(_ o: PrivilegedScenario.Outcome, requests: Int) {
        #expect(o.leaks == 0, "a vCPU outside the mode read the region")
        #expect(o.movedWhileVisible == 0, "the handler saw another vCPU run while the region was visible")
        #expect(o.outsideWhileVisible == 0, "the simulator saw a vCPU outside the mode run while the region was visible")
        #expect(o.failures == 0)
        #expect(o.stats.entries == UInt64(requests), "requests lost: \(o.stats)")
        // Each entry ran the handler once, in order, and region memory kept its count across entries.
        #expect(o.handlerCounts.sorted() == (1...UInt64(requests)).map { $0 })
        #expect(o.finalState.queue.isEmpty && o.finalState.holder == -1)
        #expect(!o.finalState.visible)
    }

    @Test func fourVCPUsConcurrentRequests() throws {
        let o = try PrivilegedScenario(cpus: 4, requests: 200).run(on: vm())
        checkInvariant(o, requests: 200)
        #expect(o.probesBlocked > 0, "the outside probes never ran")
        #expect(o.records.count == 200)
        for r in o.records { #expect(r.raisedAt <= r.enteredAt && r.enteredAt <= r.leftAt) }
    }

    @Test("stress: 32 vCPU threads, 10,000 requests")
    func stress() throws {
        let o = try PrivilegedScenario(cpus: 32, requests: 10_000, seed: 7).run(on: vm(budget: 5000))
        checkInvariant(o, requests: 10_000)
        print("privileged-mode stress: 32 vCPUs, 10000 entries in \(o.wallNanos / 1_000_000) ms, probes blocked \(o.probesBlocked)")
    }

    /// Many requests for one vCPU before it is served are all served (none coalesced or lost).
    @Test func burstOfRequestsForOneVCPU() throws {
        let v = try vm()
        let cpus = try PrivilegedScenario(cpus: 2, requests: 0).prepare(v)
        for _ in 0..<600 { try cpus[0].raisePrivileged() }
        #expect(v.privileged.protocolState.pending[0] == 600)
        let t = HostThread {
            while v.privileged.protocolState.served < 600 {
                let x = try? cpus[0].run()
                if x?.reason == .mbecViolation, var r = try? cpus[0].registers() { r.rip += 8; try? cpus[0].setRegisters(r) }
            }
        }
        t.join()
        #expect(v.privileged.statistics.entries == 600)
        #expect(v.privileged.protocolState.served == 600)
    }

    @Test func regionIsInNoHierarchyOutsideTheMode() throws {
        let v = try vm()
        _ = try PrivilegedScenario(cpus: 2, requests: 0).prepare(v)
        for h in HierarchyID.allCases {
            #expect(!v.snapshot.translate(GPA(PrivilegedSim.regionBase), in: h).present)
        }
        #expect(v.privileged.holder == nil)
    }

    @Test func badRegionsAreRefusedAndChangeNothing() throws {
        let v = try vm()
        func code(_ body: () throws -> Void) -> NPTError.Code? {
            do { try body(); return nil } catch let e as NPTError { return e.code } catch { return nil }
        }
        #expect(code { try v.defineRegion(start: GPA(0x1000), size: 0x1000, contents: []) } == .overlap)
        #expect(code { try v.defineRegion(start: GPA(PrivilegedSim.ram - 0x1000), size: 0x2000, contents: []) } == .overlap)
        #expect(code { try v.defineRegion(start: GPA(0x8000_0000), size: 0, contents: []) } == .invalidArgument)
        #expect(code { try v.defineRegion(start: GPA(0x8000_0800), size: 0x1000, contents: []) } == .misaligned)
        #expect(code { try v.defineRegion(start: GPA(0x8000_0000), size: 0x1800, contents: []) } == .misaligned)
        #expect(code { try v.defineRegion(start: GPA(0x8000_0000), size: 0x1000, contents: [UInt8](repeating: 0, count: 0x1001)) } == .invalidArgument)
        #expect(code { try v.defineRegion(start: GPA(0x8000_0000), size: 0x1000, contents: [], entryOffset: 0x1000) } == .invalidArgument)
        // A device range of the VM (the vFHA of the NVDIMM virtualizer reserves itself this way).
        try v.reserve("vFHA", GPARange(start: GPA(0x9000_0000), size: 0x1000))
        #expect(code { try v.defineRegion(start: GPA(0x8FFF_F000), size: 0x2000, contents: []) } == .overlap)
        #expect(code { try v.reserve("other", GPARange(start: GPA(0x9000_0000), size: 0x1000)) } == .overlap)
        #expect(code { try v.reserve("in RAM", GPARange(start: GPA(0x1000), size: 0x1000)) } == .overlap)
        #expect(v.region == nil)
        let cpu = try v.makeVCPU(index: 0)
        #expect(code { try cpu.raisePrivileged() } == .state)         // no region yet
        try v.defineRegion(start: GPA(0x8000_0000), size: 0x1000, contents: Assembler.encode(.rsm))
        #expect(code { try cpu.leavePrivileged() } == .state)          // not in the mode
        #expect(v.privileged.statistics.requests == 0)
        #expect(code { try v.reserve("late", GPARange(start: GPA(0x8000_0000), size: 0x1000)) } == .overlap)
    }

    /// A vCPU whose thread runs guest code and never answers a stop request (its backend swallows
    /// kicks) makes the request fail after the bound, with the view unchanged and nobody in the mode.
    @Test func unresponsiveVCPUMakesTheRequestFail() throws {
        let reg = BackendRegistry()
        let stubborn = StubbornBackend()
        try reg.register(stubborn, makeDefault: true)
        let v = try VirtualMachine(config: VMConfig(ramSize: PrivilegedSim.ram), registry: reg)
        let cpus = try PrivilegedScenario(cpus: 2, requests: 0, stopTimeoutNanos: 50_000_000).prepare(v)
        // vCPU 1 spins in place (in the loop's executable page), so it never exits by itself.
        var spin = Assembler(origin: PrivilegedSim.code + 0x800)
        spin.jmp(to: spin.here)
        try v.writeMemory(GPA(spin.origin), bytes: spin.bytes)
        var r = try cpus[1].registers()
        r.rip = spin.origin
        try cpus[1].setRegisters(r)
        let runner = HostThread { _ = try? cpus[1].run() }
        while !cpus[1].isRunning { sleepNanos(100_000) }
        sleepNanos(5_000_000)
        try cpus[0].raisePrivileged()
        let x = try cpus[0].run()
        #expect(x.reason == .privilegedEntryFailed)
        #expect(x.vector == 1)
        #expect(v.lastPrivilegedError.contains("did not stop"))
        #expect(v.privileged.statistics.failures == 1)
        #expect(v.privileged.statistics.entries == 0)
        #expect(!v.snapshot.translate(GPA(PrivilegedSim.regionBase), in: .supervisor).present)
        #expect(v.privileged.holder == nil)
        #expect(v.privileged.protocolState.stopRequested.allSatisfy { !$0 }, "the others were not released")
        stubborn.release()
        runner.join()
    }

    @Test func interruptsToAStoppedVCPUAreDeferred() throws {
        let v = try vm()
        let cpus = try PrivilegedScenario(cpus: 2, requests: 0).prepare(v)
        // Make vCPU 0 enter: vCPU 1 is not running, so the coordinator stops it on its behalf.
        try cpus[0].raisePrivileged()
        let thread = HostThread { _ = try? cpus[0].run() }
        while v.privileged.holder == nil { sleepNanos(100_000) }
        let state = v.privileged.protocolState
        #expect(state.phase[1] == .stopped)
        #expect(try cpus[1].raiseInterrupt(vector: 32) == true)
        #expect(v.privileged.statistics.deferredInterrupts == 1)
        thread.join()
    }
}

/// The simulator, except that vCPU 1 ignores kicks until released.
final class StubbornBackend: Backend, @unchecked Sendable {
    let inner = SimulatorBackend()
    let name = "stubborn"
    let summary = "simulator whose vCPU 1 ignores kicks"
    var capabilities: BackendCapabilities { inner.capabilities }
    var guestISA: GuestISA { inner.guestISA }
    private let released = Atomic<Bool>(false)
    private var vcpus: [StubbornVCPU] = []
    func release() {
        released.store(true, ordering: .releasing)
        for v in vcpus { v.inner.kick() }
    }
    func makeVM(config: VMConfig, hierarchies: any HierarchyProvider, handle: UnsafeMutableRawPointer?) throws(NPTError) -> any BackendVM {
        StubbornVM(inner: try inner.makeVM(config: config, hierarchies: hierarchies, handle: handle), owner: self)
    }
    final class StubbornVM: BackendVM, @unchecked Sendable {
        let inner: any BackendVM
        let owner: StubbornBackend
        init(inner: any BackendVM, owner: StubbornBackend) { self.inner = inner; self.owner = owner }
        func writeMemory(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(NPTError) { try inner.writeMemory(gpa, bytes) }
        func readMemory(_ gpa: GPA, _ into: UnsafeMutableRawBufferPointer) throws(NPTError) { try inner.readMemory(gpa, into) }
        func invalidate(_ inv: Invalidation) throws(NPTError) { try inner.invalidate(inv) }
        func makeVCPU(index: UInt32) throws(NPTError) -> any BackendVCPU {
            let v = try inner.makeVCPU(index: index)
            guard index == 1 else { return v }
            let s = StubbornVCPU(inner: v, owner: owner)
            owner.vcpus.append(s)
            return s
        }
        func defineRegion(_ range: GPARange, hostOffset: UInt64, contents: UnsafeRawBufferPointer) throws(NPTError) {
            try inner.defineRegion(range, hostOffset: hostOffset, contents: contents)
        }
        func regionVisibility(holder: UInt32?) { inner.regionVisibility(holder: holder) }
        func backendStatistics() throws(NPTError) -> [BackendStatistic] { try inner.backendStatistics() }
        func destroy() { inner.destroy() }
    }
    final class StubbornVCPU: BackendVCPU, @unchecked Sendable {
        let inner: any BackendVCPU
        let owner: StubbornBackend
        init(inner: any BackendVCPU, owner: StubbornBackend) { self.inner = inner; self.owner = owner }
        func registers() throws(NPTError) -> Registers { try inner.registers() }
        func setRegisters(_ r: Registers) throws(NPTError) { try inner.setRegisters(r) }
        func expose(_ h: HierarchyID) throws(NPTError) { try inner.expose(h) }
        func setExitControls(_ c: ExitControls) throws(NPTError) { try inner.setExitControls(c) }
        func run() throws(NPTError) -> VMExit {
            while true {
                let x = try inner.run()
                if x.reason == .kicked {
                    // Swallowed until released; then it ends the test's run.
                    if !owner.released.load(ordering: .acquiring) { continue }
                    return VMExit(reason: .budget)
                }
                return x
            }
        }
        func injectFault(vector: UInt32, errorCode: UInt64, address: UInt64) throws(NPTError) {
            try inner.injectFault(vector: vector, errorCode: errorCode, address: address)
        }
        func kick() { if owner.released.load(ordering: .acquiring) { inner.kick() } }
        func backendStatistics() throws(NPTError) -> [BackendStatistic] { try inner.backendStatistics() }
        func destroy() { inner.destroy() }
    }
}
