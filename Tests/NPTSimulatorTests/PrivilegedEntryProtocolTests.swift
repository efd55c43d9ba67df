import NPTCore
import NPTScenarios
import NPTSimulator
import Synchronization
import Testing

/// The core tells a backend that a vCPU enters and leaves the privileged mode (plugin interface 2:
/// vcpu_enter_privileged / vcpu_leave_privileged) instead of leaving it to infer that from a
/// register write: what it is told, in which order, with the region in the view, and that an entry
/// the backend refuses is undone (nobody in the mode, region out of the view, registers back).
@Suite(.serialized) struct PrivilegedEntryProtocolTests {
    /// The simulator, recording what the core tells it about the mode.
    final class ToldBackend: Backend, @unchecked Sendable {
        let inner = SimulatorBackend()
        let name = "told"
        let summary = "the simulator, recording privileged-mode entries and exits"
        var capabilities: BackendCapabilities { inner.capabilities }
        var guestISA: GuestISA { inner.guestISA }
        enum Event: Equatable { case enter(PrivilegedEntry, regionVisible: Bool), leave(vcpu: UInt32, regionVisible: Bool) }
        let events = Mutex<[Event]>([])
        /// Entries refused with NPT_ERR_BACKEND while > 0.
        let refuseEntries = Atomic<Int>(0)
        /// The region's first page, to see whether the view holds it when the backend is told.
        let regionPage = Atomic<UInt64>(0)
        weak var hierarchies: (any HierarchyProvider)?
        func makeVM(config: VMConfig, hierarchies: any HierarchyProvider, handle: UnsafeMutableRawPointer?) throws(NPTError) -> any BackendVM {
            self.hierarchies = hierarchies
            return VM(inner: try inner.makeVM(config: config, hierarchies: hierarchies, handle: handle), owner: self)
        }
        func regionVisible() -> Bool {
            guard let h = hierarchies else { return false }
            return h.currentSnapshot().translate(GPA(regionPage.load(ordering: .relaxed)), in: .supervisor).present
        }
        final class VM: BackendVM, @unchecked Sendable {
            let inner: any BackendVM
            let owner: ToldBackend
            init(inner: any BackendVM, owner: ToldBackend) { self.inner = inner; self.owner = owner }
            func writeMemory(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(NPTError) { try inner.writeMemory(gpa, bytes) }
            func readMemory(_ gpa: GPA, _ into: UnsafeMutableRawBufferPointer) throws(NPTError) { try inner.readMemory(gpa, into) }
            func invalidate(_ inv: Invalidation) throws(NPTError) { try inner.invalidate(inv) }
            func makeVCPU(index: UInt32) throws(NPTError) -> any BackendVCPU { VCPU(inner: try inner.makeVCPU(index: index), owner: owner, index: index) }
            func defineRegion(_ range: GPARange, hostOffset: UInt64, contents: UnsafeRawBufferPointer) throws(NPTError) {
                owner.regionPage.store(range.start.raw, ordering: .relaxed)
                try inner.defineRegion(range, hostOffset: hostOffset, contents: contents)
            }
            func regionVisibility(holder: UInt32?) { inner.regionVisibility(holder: holder) }
            func backendStatistics() throws(NPTError) -> [BackendStatistic] { try inner.backendStatistics() }
            func destroy() { inner.destroy() }
        }
        final class VCPU: BackendVCPU, @unchecked Sendable {
            let inner: any BackendVCPU
            let owner: ToldBackend
            let index: UInt32
            init(inner: any BackendVCPU, owner: ToldBackend, index: UInt32) { self.inner = inner; self.owner = owner; self.index = index }
            func registers() throws(NPTError) -> Registers { try inner.registers() }
            func setRegisters(_ r: Registers) throws(NPTError) { try inner.setRegisters(r) }
            func expose(_ h: HierarchyID) throws(NPTError) { try inner.expose(h) }
            func setExitControls(_ c: ExitControls) throws(NPTError) { try inner.setExitControls(c) }
            func run() throws(NPTError) -> VMExit { try inner.run() }
            func injectFault(vector: UInt32, errorCode: UInt64, address: UInt64) throws(NPTError) {
                try inner.injectFault(vector: vector, errorCode: errorCode, address: address)
            }
            func kick() { inner.kick() }
            func enterPrivileged(_ entry: PrivilegedEntry, interrupted: Registers) throws(NPTError) {
                owner.events.withLock { $0.append(.enter(entry, regionVisible: owner.regionVisible())) }
                if owner.refuseEntries.load(ordering: .relaxed) > 0 {
                    owner.refuseEntries.subtract(1, ordering: .relaxed)
                    throw NPTError(.backend, "entry refused by the test")
                }
                try inner.enterPrivileged(entry, interrupted: interrupted)
            }
            func leavePrivileged() throws(NPTError) {
                owner.events.withLock { $0.append(.leave(vcpu: index, regionVisible: owner.regionVisible())) }
                try inner.leavePrivileged()
            }
            func backendStatistics() throws(NPTError) -> [BackendStatistic] { try inner.backendStatistics() }
            func destroy() { inner.destroy() }
        }
    }

    func makeVM(_ b: ToldBackend) throws -> VirtualMachine {
        let reg = BackendRegistry()
        try reg.register(b, makeDefault: true)
        return try VirtualMachine(config: VMConfig(ramSize: PrivilegedSim.ram, defaultPermissions: [.read, .write],
                                                   maxStepsPerRun: 2000), registry: reg)
    }

    @Test func everyEntryAndExitIsToldWithTheRegionInTheView() throws {
        let b = ToldBackend()
        let o = try PrivilegedScenario(cpus: 3, requests: 40, seed: 5).run(on: makeVM(b))
        #expect(o.stats.entries == 40 && o.failures == 0 && o.leaks == 0 && o.movedWhileVisible == 0)
        let ev = b.events.withLock { $0 }
        #expect(ev.count == 80)
        // Strictly alternating: each entry is followed by the same vCPU's exit.
        for k in stride(from: 0, to: ev.count - 1, by: 2) {
            guard case .enter(let e, let visibleAtEntry) = ev[k], case .leave(let v, let visibleAtLeave) = ev[k + 1] else {
                Issue.record("event \(k): \(ev[k]), then \(ev[k + 1])")
                continue
            }
            #expect(e.vcpuIndex == v)
            #expect(e.region.start.raw == PrivilegedSim.regionBase)
            #expect(e.entryRIP == PrivilegedSim.regionBase) // the scenario enters at offset 0
            #expect(visibleAtEntry, "the backend was told of an entry before the region was in the view")
            #expect(visibleAtLeave, "the backend was told of the exit after the region left the view")
        }
    }

    @Test func aRefusedEntryIsUndone() throws {
        let b = ToldBackend()
        let vm = try makeVM(b)
        let cpus = try PrivilegedScenario(cpus: 2, requests: 0).prepare(vm)
        let before = try cpus[0].registers()
        b.refuseEntries.store(1, ordering: .relaxed)
        try cpus[0].raisePrivileged()
        // The entry happens inside run: the refusal surfaces there, with the backend's message.
        #expect(throws: NPTError.self) { _ = try cpus[0].run() }
        let s = vm.privileged.protocolState
        #expect(s.holder == -1 && !s.visible, "an entry the backend refused left state behind: \(s)")
        #expect(!vm.snapshot.translate(GPA(PrivilegedSim.regionBase), in: .supervisor).present)
        let after = try cpus[0].registers()
        #expect(after.rip == before.rip && after.cpl == before.cpl && after.cr0 == before.cr0)
        // The next request enters normally.
        try cpus[0].raisePrivileged()
        var entered = false
        for _ in 0..<100 where !entered {
            _ = try cpus[0].run()
            entered = b.events.withLock { $0.count } >= 2
        }
        #expect(entered)
    }
}
