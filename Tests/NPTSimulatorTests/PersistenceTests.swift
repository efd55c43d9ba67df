@testable import NPTCore
import NPTScenarios
import NPTSimulator
import Synchronization
import Testing
import NPTHost

@discardableResult
func runToHalt(_ v: VirtualCPU) throws -> [(port: Int32, value: UInt64)] { try NVDIMMScenario.runToHalt(v) }

/// The NVDIMM scenario on simulator VMs of their own backend (its own platform).
extension NVDIMMScenario {
    static let ram = NVDIMMSim.ram
    static let nvdimmGPA = NVDIMMSim.nvdimmGPA
    static let nvdimmSize = NVDIMMSim.nvdimmSize
    static func makeVM(backend: SimulatorBackend, budget: UInt64 = 0) throws(NPTError) -> VirtualMachine {
        let reg = BackendRegistry()
        try reg.register(backend, makeDefault: true)
        return try VirtualMachine(config: VMConfig(ramSize: ram, maxStepsPerRun: budget), registry: reg)
    }
    /// Record k of vCPU 0's log on the media after a power failure: its first word (the magic), 0 if lost.
    func magic(_ vm: VirtualMachine, _ k: Int) throws -> UInt64 { try read64(vm, recordGPA(NVDIMMSim.image, cpu: 0, k)) }
}

func read64(_ vm: VirtualMachine, _ gpa: UInt64) throws -> UInt64 {
    var v: UInt64 = 0
    try withUnsafeMutableBytes(of: &v) { b throws(NPTError) in try vm.readMemory(GPA(gpa), b) }
    return v
}

@Suite struct PersistenceTests {
    typealias S = NVDIMMScenario

    @Test func platformNeedingFlushTrapsEveryGuestFlushOnceAndKeepsDurableData() throws {
        let backend = try SimulatorBackend(platform: .standard(needsWPQFlush: true))
        let vm = try S.makeVM(backend: backend)
        let checker = CrashChecker(platform: backend.platform)
        let scenario = S(cpus: 1, records: 4)
        let v = try scenario.setUp(vm)[0]
        #expect(vm.flushHintTrapped)
        let printed = try runToHalt(v)
        let report = checker.stop()
        #expect(printed.filter { $0.port == S.Port.durable }.map(\.value) == [0, 1, 2, 3])
        let f = vm.flushStatistics()
        // Exactly one exit per guest flush; region 1 is interleaved across two controllers.
        #expect(f.exits == 4 && f.guestFlushes == 4)
        #expect(vm.flushTargets.map(\.target.controller) == [0x000, 0x100])
        #expect(f.physicalFlushes == 8 && f.coalesced == 0)
        #expect(f.untrappedWrites == 0)
        #expect(vm.statistics().exitsEPTViolation == 4)
        #expect(report.losses.isEmpty, "\(report.losses)")
        #expect(report.durableStores == 8)    // two stores a record: the magic and the index
        #expect(report.crashPoints > 20)
        // The power cut: the durable records survive; the two the guest did not flush do not
        // (the WPQ is outside this platform's persistence domain).
        try vm.powerFailure()
        for k in 0..<4 { #expect(try scenario.holdsRecord(vm, cpu: 0, k)) }
        #expect(try scenario.magic(vm, 4) == 0)
        #expect(try scenario.magic(vm, 5) == 0)
    }

    @Test func platformWithoutWPQFlushingCostsNoExit() throws {
        let backend = try SimulatorBackend(platform: .standard(needsWPQFlush: false))
        let vm = try S.makeVM(backend: backend)
        let checker = CrashChecker(platform: backend.platform)
        let scenario = S(needsWPQFlush: false, cpus: 1, records: 4)
        let v = try scenario.setUp(vm)[0]
        #expect(!vm.flushHintTrapped)
        try runToHalt(v)
        let report = checker.stop()
        let f = vm.flushStatistics()
        #expect(f.exits == 0 && f.guestFlushes == 0 && f.physicalFlushes == 0)
        #expect(f.untrappedWrites == 4)
        #expect(vm.statistics().exitsEPTViolation == 0)
        #expect(report.losses.isEmpty, "\(report.losses)")
        #expect(report.durableStores == 8)
        try vm.powerFailure()
        for k in 0..<4 { #expect(try scenario.holdsRecord(vm, cpu: 0, k)) }
        // ADR drains the WPQ at the power failure: fenced data survives, cached data does not.
        #expect(try scenario.magic(vm, 4) == 0)
        #expect(try scenario.holdsRecord(vm, cpu: 0, 5))
    }

    @Test func disablingTrapsWhereFlushingIsNeededLosesDataAndTheCheckerSaysSo() throws {
        let backend = try SimulatorBackend(platform: .standard(needsWPQFlush: true))
        let vm = try S.makeVM(backend: backend)
        try vm.addNVDIMM(gpa: GPA(S.nvdimmGPA), size: S.nvdimmSize, hostRegion: 1, regionOffset: 0)
        try vm.setFlushOptions(FlushOptions(trap: .never))
        let checker = CrashChecker(platform: backend.platform)
        let scenario = S(cpus: 1, records: 4)
        let v = try scenario.setUp(vm)[0]
        #expect(!vm.flushHintTrapped)
        try runToHalt(v)
        let report = checker.stop()
        #expect(vm.flushStatistics().exits == 0)
        #expect(report.durableStores == 8)
        #expect(!report.losses.isEmpty)
        #expect(Set(report.losses.map { $0.spa & ~63 }).count == 4, "every durable record is lost at some crash point")
        try vm.powerFailure()
        #expect(try scenario.magic(vm, 0) == 0)
    }

    /// Several vCPUs interleaved instruction by instruction in seeded random orders; every event of
    /// every order is a crash point.
    @Test(arguments: [UInt64(1), 2, 3, 4, 5])
    func interleavedVCPUsKeepEveryDurableStore(seed: UInt64) throws {
        let backend = try SimulatorBackend(platform: .standard(needsWPQFlush: true))
        let vm = try S.makeVM(backend: backend, budget: 1)
        let checker = CrashChecker(platform: backend.platform)
        let cpus = try S(cpus: 3, records: 3).setUp(vm)
        var rng = SplitMix64(seed: seed)
        var live = Array(cpus.indices)
        while !live.isEmpty {
            let i = live[Int(rng.next() % UInt64(live.count))]
            for _ in 0..<(1 + rng.next() % 3) {
                let x = try cpus[i].run()
                if x.reason == .halt { live.removeAll { $0 == i }; break }
                guard x.reason == .budget || x.reason == .io else { throw NPTError(.state, "unexpected exit \(x)") }
            }
        }
        let report = checker.stop()
        #expect(report.losses.isEmpty, "seed \(seed): \(report.losses.prefix(3))")
        #expect(report.durableStores == 18)
        let f = vm.flushStatistics()
        #expect(f.exits == 9 && f.guestFlushes == 9)
        // One thread drives every vCPU: nothing is concurrent, so nothing coalesces.
        #expect(f.physicalFlushes == 18 && f.coalesced == 0)
    }

    /// vCPUs on real threads flushing at once: every (guest flush, flush hint) pair is met by a
    /// physical flush, its own or a coalesced one; without coalescing each makes its own.
    @Test(arguments: [true, false])
    func concurrentFlushesCoalesce(coalesce: Bool) throws {
        let backend = try SimulatorBackend(platform: .standard(needsWPQFlush: true, flushLatencyNanos: 20_000))
        let vm = try S.makeVM(backend: backend)
        try vm.addNVDIMM(gpa: GPA(S.nvdimmGPA), size: S.nvdimmSize, hostRegion: 1, regionOffset: 0)
        try vm.setFlushOptions(FlushOptions(trap: .auto, coalesce: coalesce))
        let checker = CrashChecker(platform: backend.platform)
        let cpus = try S(cpus: 4, records: 20, tail: false).setUp(vm)
        let failures = Mutex(0)
        let threads = cpus.map { v in HostThread { if (try? runToHalt(v)) == nil { failures.withLock { $0 += 1 } } } }
        for t in threads { t.join() }
        let report = checker.stop()
        #expect(failures.withLock { $0 } == 0)
        #expect(report.losses.isEmpty)
        let f = vm.flushStatistics()
        #expect(f.guestFlushes == 80 && f.exits == 80)
        #expect(f.physicalFlushes + f.coalesced == 160)
        if coalesce { #expect(f.physicalFlushes <= 160) } else { #expect(f.coalesced == 0 && f.physicalFlushes == 160) }
        #expect(backend.platform.physicalFlushes == f.physicalFlushes)
    }

    /// A physical flush that started before a guest's write does not satisfy it.
    @Test func aFlushInProgressDoesNotSatisfyALaterRequest() throws {
        let seq = FlushSequencer()
        let bodies = Atomic<Int>(0)
        let release = Atomic<Bool>(false)
        let started = Atomic<Bool>(false)
        let first = HostThread {
            _ = try? seq.flush(coalesce: true) { () throws(NPTError) in
                bodies.wrappingAdd(1, ordering: .relaxed)
                started.store(true, ordering: .releasing)
                while !release.load(ordering: .acquiring) { sleepNanos(100_000) }
            }
        }
        while !started.load(ordering: .acquiring) { sleepNanos(100_000) }
        let led = Mutex<Bool?>(nil)
        let second = HostThread {
            let l = try? seq.flush(coalesce: true) { () throws(NPTError) in bodies.wrappingAdd(1, ordering: .relaxed) }
            led.withLock { $0 = l }
        }
        sleepNanos(20_000_000)
        #expect(led.withLock { $0 } == nil, "the second request returned while the first flush, started before it, was still running")
        release.store(true, ordering: .releasing)
        first.join(); second.join()
        #expect(bodies.load(ordering: .relaxed) == 2)
        #expect(led.withLock { $0 } == true)
    }

    /// Requests that queue behind a running flush share the next one: three requests, two flushes.
    @Test func requestsQueuedBehindAFlushShareTheNextOne() throws {
        let seq = FlushSequencer()
        let bodies = Atomic<Int>(0)
        let release = Atomic<Bool>(false)
        let started = Atomic<Bool>(false)
        let first = HostThread {
            _ = try? seq.flush(coalesce: true) { () throws(NPTError) in
                bodies.wrappingAdd(1, ordering: .relaxed)
                started.store(true, ordering: .releasing)
                while !release.load(ordering: .acquiring) { sleepNanos(100_000) }
            }
        }
        while !started.load(ordering: .acquiring) { sleepNanos(100_000) }
        let led = Mutex<[Bool]>([])
        let waiters = (0..<2).map { _ in
            HostThread {
                let l = try? seq.flush(coalesce: true) { () throws(NPTError) in bodies.wrappingAdd(1, ordering: .relaxed) }
                led.withLock { $0.append(l ?? false) }
            }
        }
        while seq.waiters < 2 { sleepNanos(100_000) }   // both are queued behind the open flush
        release.store(true, ordering: .releasing)
        first.join()
        for w in waiters { w.join() }
        #expect(bodies.load(ordering: .relaxed) == 2)
        #expect(led.withLock { $0.sorted { !$0 && $1 } } == [false, true], "one waiter flushed, the other was coalesced")
    }

    @Test func vfhaIsAPageOutsideRAMAndNVDIMMTiedToExactlyTheControllersBehindTheRanges() throws {
        let backend = SimulatorBackend()
        let vm = try S.makeVM(backend: backend)
        try vm.addNVDIMM(gpa: GPA(0x2_0000_0000), size: 16 << 20, hostRegion: 2, regionOffset: 0x10_0000)
        let vfha = try #require(vm.virtualFlushHint)
        #expect(vfha.raw % 0x1000 == 0)
        #expect(vfha.raw >= S.ram)
        for r in vm.nvdimmRanges { #expect(!r.range.contains(vfha)) }
        #expect(vm.flushTargets.map(\.target) == [HostPersistence.FlushTarget(controller: 0x1000, address: 0xF000_2000)])
        try vm.addNVDIMM(gpa: GPA(0x1_0000_0000), size: 2 << 20, hostRegion: 1, regionOffset: 0)
        #expect(vm.virtualFlushHint == vfha, "the vFHA does not move")
        #expect(Set(vm.flushTargets.map(\.target.controller)) == [0x000, 0x100, 0x1000])
        // Read-only in every hierarchy while trapped, to the scratch page; read-write when not.
        for h in HierarchyID.allCases {
            let t = vm.snapshot.translate(vfha, in: h)
            #expect(t.present && t.permissions == [.read])
        }
        let dram = try SimulatorBackend(platform: .standard(needsWPQFlush: false))
        let vm2 = try S.makeVM(backend: dram)
        try vm2.addNVDIMM(gpa: GPA(0x1_0000_0000), size: 2 << 20, hostRegion: 1, regionOffset: 0)
        let t2 = vm2.snapshot.translate(try #require(vm2.virtualFlushHint), in: .user)
        #expect(t2.permissions == [.read, .write])
        // Switching to trap everywhere write-protects it (and invalidates the old translation).
        let before = vm2.statistics().invalidations
        try vm2.setFlushOptions(FlushOptions(trap: .always))
        #expect(vm2.flushHintTrapped)
        #expect(vm2.snapshot.translate(vm2.virtualFlushHint!, in: .user).permissions == [.read])
        #expect(vm2.statistics().invalidations > before)
    }

    @Test func badNVDIMMRangesAreRefusedAndChangeNothing() throws {
        let backend = SimulatorBackend()
        let vm = try S.makeVM(backend: backend)
        try vm.addNVDIMM(gpa: GPA(0x1_0000_0000), size: 2 << 20, hostRegion: 1, regionOffset: 0)
        let ranges = vm.nvdimmRanges, reserved = vm.reservedRanges.map(\.name), vfha = vm.virtualFlushHint
        let cases: [(GPA, UInt64, UInt32, UInt64, NPTError.Code)] = [
            (GPA(0x1_0000_0800), 0x1000, 1, 0x40_0000, .misaligned),
            (GPA(0x3_0000_0000), 0x1800, 1, 0x40_0000, .misaligned),
            (GPA(0x3_0000_0000), 0x1000, 1, 0x40_0010, .misaligned),
            (GPA(0x3_0000_0000), 0, 1, 0x40_0000, .invalidArgument),
            (GPA(0x10_0000), 0x1000, 1, 0x40_0000, .overlap),                 // RAM
            (GPA(0x1_0010_0000), 0x1000, 1, 0x40_0000, .overlap),             // the first range
            (vfha!, 0x1000, 1, 0x40_0000, .overlap),                          // the vFHA
            (GPA(0x3_0000_0000), 0x1000, 1, 0x1000, .overlap),                // same host bytes
            (GPA(0x3_0000_0000), 0x1000, 9, 0, .notFound),                    // no such host region
            (GPA(0x3_0000_0000), 2 << 20, 2, (512 << 20) - 0x1000, .outOfRange), // past the region
            (GPA(0xFFFF_FFFF_F000), 0x2000, 1, 0x40_0000, .outOfRange),       // past 48 bits
        ]
        for (gpa, size, region, offset, code) in cases {
            #expect(throws: NPTError.self) { try vm.addNVDIMM(gpa: gpa, size: size, hostRegion: region, regionOffset: offset) }
            do { try vm.addNVDIMM(gpa: gpa, size: size, hostRegion: region, regionOffset: offset) } catch {
                #expect(error.code == code, "\(gpa) \(hex(size)) region \(region) +\(hex(offset)): \(error)")
            }
            #expect(vm.nvdimmRanges == ranges)
            #expect(vm.reservedRanges.map(\.name) == reserved)
            #expect(vm.virtualFlushHint == vfha)
        }
        // A backend without persistent memory says so.
        let reg = BackendRegistry()
        try reg.register(NoPMemBackend(), makeDefault: true)
        let plain = try VirtualMachine(config: VMConfig(ramSize: 1 << 20, mbecMode: .lazy), registry: reg)
        #expect(throws: NPTError(.unsupported, "backend 'nopmem' cannot back NVDIMM ranges")) {
            try plain.addNVDIMM(gpa: GPA(0x1_0000_0000), size: 0x1000, hostRegion: 1, regionOffset: 0)
        }
        #expect(throws: NPTError.self) { try plain.guestNFIT() }
    }

    @Test func guestNFITNamesTheVFHAForEveryVirtualDIMM() throws {
        let vm = try S.makeVM(backend: SimulatorBackend())
        try vm.addNVDIMM(gpa: GPA(0x1_0000_0000), size: 2 << 20, hostRegion: 1, regionOffset: 0)
        try vm.addNVDIMM(gpa: GPA(0x1_0040_0000), size: 4 << 20, hostRegion: 2, regionOffset: 0)
        let bytes = try vm.guestNFIT()
        #expect(bytes.reduce(UInt8(0), &+) == 0)
        let t = try NFIT.parse(bytes)
        #expect(t.spaRanges.map(\.base) == [0x1_0000_0000, 0x1_0040_0000])
        #expect(t.spaRanges.map(\.length) == [2 << 20, 4 << 20])
        #expect(t.spaRanges.allSatisfy { $0.isPersistentMemory })
        #expect(t.flushHints.count == 2)
        #expect(t.flushHints.allSatisfy { $0.addresses == [vm.virtualFlushHint!.raw] })
        #expect(Set(t.memoryMaps.map(\.deviceHandle)) == Set(t.flushHints.map(\.deviceHandle)))
        #expect(t.memoryMaps.map(\.spaRangeIndex) == t.spaRanges.map(\.index))
        // A control region per DIMM, and the rules of GuestNVDIMM with the SSDT's handles.
        #expect(t.memoryMaps.map(\.controlRegionIndex) == t.controlRegions.map(\.index))
        let guest = try vm.guestNVDIMM()
        #expect(guest.dimms.map(\.handle) == t.memoryMaps.map(\.deviceHandle))
        #expect(GuestNVDIMM.violations(nfit: t, table: bytes, ssdtHandles: guest.dimms.map(\.handle),
                                       flushHint: vm.virtualFlushHint!.raw) == [])
        #expect(try vm.guestNVDIMMSSDT() == guest.ssdt())
    }

    /// The guest's platform capabilities follow the host regions behind its ranges: WPQ flushing
    /// needed (bit 1 clear, no persistence_domain in a Linux guest) or ADR (bit 1 set), and a VM
    /// with one range on each kind of region is told the weaker one.
    @Test func guestNFITPlatformCapabilitiesFollowTheHost() throws {
        for (needs, caps) in [(true, UInt32(0)), (false, UInt32(2))] {
            let vm = try S.makeVM(backend: SimulatorBackend(platform: .standard(needsWPQFlush: needs)))
            try vm.addNVDIMM(gpa: GPA(0x1_0000_0000), size: 2 << 20, hostRegion: 1, regionOffset: 0)
            let t = try NFIT.parse(try vm.guestNFIT())
            #expect(t.platformCapabilities == NFIT.PlatformCapabilities(highestValid: 1, capabilities: caps))
            #expect(try vm.guestNVDIMM().domain == (needs ? .media : .memoryController))
        }
        // The NFIT fixture's platform (region 1 needs flushing there, its ADR twin does not).
        for (file, caps) in [("nfit.aml", UInt32(0)), ("nfit-adr.aml", UInt32(2))] {
            let d = try PlatformDescription.from(nfit: try NFIT.parse(try fixture("nfit/" + file)))
            let vm = try S.makeVM(backend: SimulatorBackend(platform: d))
            try vm.addNVDIMM(gpa: GPA(0x1_0000_0000), size: 2 << 20, hostRegion: 1, regionOffset: 0)
            #expect(try NFIT.parse(try vm.guestNFIT()).platformCapabilities?.capabilities == caps, "\(file)")
        }
        let vm = try S.makeVM(backend: SimulatorBackend())
        #expect(throws: NPTError.self) { try vm.guestNVDIMMSSDT() }
    }

    /// An NVDIMM range right after RAM with the same permissions: no large leaf may cover both.
    @Test func largeLeavesDoNotSpanRAMAndAnNVDIMMWindow() throws {
        let reg = BackendRegistry()
        try reg.register(SimulatorBackend(), makeDefault: true)
        let ram: UInt64 = (1 << 30) - (2 << 20)
        let vm = try VirtualMachine(config: VMConfig(ramSize: ram), registry: reg)
        let r = try vm.addNVDIMM(gpa: GPA(ram), size: 2 << 20, hostRegion: 1, regionOffset: 0)
        for h in HierarchyID.allCases {
            let inRAM = vm.snapshot.translate(GPA(0x20_1000), in: h)
            #expect(inRAM.hostOffset.raw + (0x20_1000 - inRAM.pageBase.raw) == 0x20_1000)
            let inPM = vm.snapshot.translate(GPA(ram + 0x1000), in: h)
            #expect(inPM.present)
            #expect(inPM.hostOffset.raw + (ram + 0x1000 - inPM.pageBase.raw) == r.hostOffset + 0x1000)
            #expect(inPM.level <= 2)
        }
    }

    @Test func platformFromTheNFITFixtures() throws {
        for (file, needs) in [("nfit.aml", true), ("nfit-adr.aml", false)] {
            let bytes = try fixture("nfit/" + file)
            let d = try PlatformDescription.from(nfit: try NFIT.parse(bytes))
            #expect(d.domain == (needs ? .media : .memoryController))
            let host = d.persistence
            #expect(host.needsWPQFlush == needs)
            #expect(host.regions.map(\.controllers) == HostPersistence.fromNFIT(try NFIT.parse(bytes)).regions.map(\.controllers))
            // A VM on it runs the scenario with no loss either way.
            let backend = try SimulatorBackend(platform: d)
            let vm = try S.makeVM(backend: backend)
            let checker = CrashChecker(platform: backend.platform)
            let v = try S(needsWPQFlush: needs, cpus: 1, records: 2).setUp(vm)[0]
            try runToHalt(v)
            #expect(checker.stop().losses.isEmpty)
            #expect(vm.flushStatistics().exits == (needs ? 2 : 0))
        }
    }
}

final class NoPMemBackend: Backend {
    let name = "nopmem"
    let summary = "a backend with no persistent memory"
    let capabilities: BackendCapabilities = [.mbecEmulation, .exitOnEscalation, .run]
    let guestISA = GuestISA.simulator
    func makeVM(config: VMConfig, hierarchies: any HierarchyProvider, handle: UnsafeMutableRawPointer?) throws(NPTError) -> any BackendVM {
        try SimulatorBackend().makeVM(config: config, hierarchies: hierarchies, handle: handle)
    }
}

/// The simulator with failures on demand: `invalidate` or `defineFlushHintPage` of its VMs throws
/// once when armed.
final class FlakyBackend: Backend {
    let name = "flaky"
    let summary = "the simulator, failing on demand"
    let inner = SimulatorBackend()
    let failInvalidate = Atomic<Bool>(false)
    let failDefine = Atomic<Bool>(false)
    var capabilities: BackendCapabilities { inner.capabilities }
    var guestISA: GuestISA { inner.guestISA }
    func hostPersistence() throws(NPTError) -> HostPersistence { try inner.hostPersistence() }
    func makeVM(config: VMConfig, hierarchies: any HierarchyProvider, handle: UnsafeMutableRawPointer?) throws(NPTError) -> any BackendVM {
        FlakyVM(inner: try inner.makeVM(config: config, hierarchies: hierarchies, handle: handle), backend: self)
    }
}

final class FlakyVM: BackendVM {
    let inner: any BackendVM
    let backend: FlakyBackend
    init(inner: any BackendVM, backend: FlakyBackend) { self.inner = inner; self.backend = backend }
    func writeMemory(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(NPTError) { try inner.writeMemory(gpa, bytes) }
    func readMemory(_ gpa: GPA, _ into: UnsafeMutableRawBufferPointer) throws(NPTError) { try inner.readMemory(gpa, into) }
    func invalidate(_ inv: Invalidation) throws(NPTError) {
        if backend.failInvalidate.exchange(false, ordering: .relaxed) { throw NPTError(.backend, "invalidate failed on purpose") }
        try inner.invalidate(inv)
    }
    func makeVCPU(index: UInt32) throws(NPTError) -> any BackendVCPU { try inner.makeVCPU(index: index) }
    var hostPersistence: HostPersistence? { inner.hostPersistence }
    func attachPersistentMemory(_ range: GPARange, region: UInt32, regionOffset: UInt64, hostOffset: UInt64) throws(NPTError) {
        try inner.attachPersistentMemory(range, region: region, regionOffset: regionOffset, hostOffset: hostOffset)
    }
    func defineFlushHintPage(_ gpa: GPA, hostOffset: UInt64, trapped: Bool) throws(NPTError) {
        if backend.failDefine.exchange(false, ordering: .relaxed) { throw NPTError(.backend, "define failed on purpose") }
        try inner.defineFlushHintPage(gpa, hostOffset: hostOffset, trapped: trapped)
    }
    func physicalFlush(region: UInt32, target: HostPersistence.FlushTarget) throws(NPTError) {
        try inner.physicalFlush(region: region, target: target)
    }
    var untrappedFlushHintWrites: UInt64 { inner.untrappedFlushHintWrites }
    func powerFailure() throws(NPTError) { try inner.powerFailure() }
    func destroy() { inner.destroy() }
}

@Suite struct PersistenceRollbackTests {
    /// A backend step of addNVDIMM / setFlushOptions that fails leaves the VM as it was, and the same
    /// range can be added afterwards (the simulator replaces the attachment the core forgot).
    @Test func failingBackendStepsChangeNothing() throws {
        let backend = FlakyBackend()
        let reg = BackendRegistry()
        try reg.register(backend, makeDefault: true)
        let vm = try VirtualMachine(config: VMConfig(ramSize: 1 << 20), registry: reg)
        let gpa = GPA(0x1_0000_0000)
        let runs = vm.policyRuns().map { "\($0.0) \($0.1)" }
        let leaves = vm.snapshot.translate(gpa, in: .supervisor).present
        // The flush hint page fails after the range was attached.
        backend.failDefine.store(true, ordering: .relaxed)
        #expect(throws: NPTError.self) { try vm.addNVDIMM(gpa: gpa, size: 2 << 20, hostRegion: 1, regionOffset: 0) }
        #expect(vm.nvdimmRanges.isEmpty)
        #expect(vm.reservedRanges.isEmpty)
        #expect(vm.virtualFlushHint == nil)
        #expect(vm.policyRuns().map { "\($0.0) \($0.1)" } == runs)
        #expect(vm.snapshot.translate(gpa, in: .supervisor).present == leaves)
        let r = try vm.addNVDIMM(gpa: gpa, size: 2 << 20, hostRegion: 1, regionOffset: 0)
        let vfha = try #require(vm.virtualFlushHint)
        #expect(vm.flushHintTrapped)
        #expect(vm.snapshot.translate(gpa, in: .user).present)

        // A second range whose mapping fails: the first one and the vFHA stay as they were.
        let runs2 = vm.policyRuns().map { "\($0.0) \($0.1)" }
        backend.failDefine.store(true, ordering: .relaxed)
        #expect(throws: NPTError.self) { try vm.addNVDIMM(gpa: GPA(0x1_0040_0000), size: 2 << 20, hostRegion: 2, regionOffset: 0) }
        #expect(vm.nvdimmRanges == [r])
        #expect(vm.virtualFlushHint == vfha)
        #expect(vm.flushHintTrapped)
        #expect(vm.policyRuns().map { "\($0.0) \($0.1)" } == runs2)
        #expect(vm.reservedRanges.count == 2)

        // Changing the options: untrapped -> trapped invalidates the vFHA's write permission (adding
        // a range loses no permission, so this is where an invalidation can fail); if it fails, the
        // options, the trap decision and the mapping stay.
        try vm.setFlushOptions(FlushOptions(trap: .never))
        #expect(!vm.flushHintTrapped)
        #expect(vm.snapshot.translate(vfha, in: .user).permissions.contains(.write))
        backend.failInvalidate.store(true, ordering: .relaxed)
        #expect(throws: NPTError.self) { try vm.setFlushOptions(FlushOptions(trap: .always)) }
        #expect(!vm.flushHintTrapped)
        #expect(vm.flushOptions.trap == .never)
        #expect(vm.snapshot.translate(vfha, in: .user).permissions.contains(.write))
        #expect(!vm.persistence.isFlushHintWrite({ var x = VMExit(reason: .eptViolation); x.gpa = vfha; x.qualification = 2; return x }()))
        try vm.setFlushOptions(FlushOptions(trap: .auto))
        #expect(vm.flushHintTrapped)
        #expect(vm.snapshot.translate(vfha, in: .user).permissions == [.read])
        try vm.addNVDIMM(gpa: GPA(0x1_0040_0000), size: 2 << 20, hostRegion: 2, regionOffset: 0)
        #expect(vm.nvdimmRanges.count == 2)
    }
}
