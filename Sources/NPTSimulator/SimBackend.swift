import NPTCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The built-in simulator backend: a small guest ISA (docs/guest-isa.md) interpreted over a real
/// two-dimensional page walk (guest 4-level paging, then the exposed shadow hierarchy), with a
/// per-vCPU TLB tagged by hierarchy. Deterministic: the same inputs give the same exits.
public final class SimulatorBackend: Backend {
    public let name: String
    public let summary: String
    public let capabilities: BackendCapabilities
    public var guestISA: GuestISA { .simulator }
    public static let allCapabilities: BackendCapabilities = [.mbecEmulation, .exitOnEscalation, .exitOnReturn, .linearModeInfo, .run,
                                                              .privilegedMode, .persistentMemory]
    private let platformBox: Mutex<PersistentPlatform>

    /// `platform`: the simulated host's persistent memory (refused if inconsistent).
    /// `withoutExits`: capabilities the simulator pretends not to have (e.g. `.exitOnEscalation` to
    /// behave like a backend without privilege-change exits); it then never takes those exits.
    public init(platform: PlatformDescription = .standard(needsWPQFlush: true), name: String = "sim",
                withoutExits: BackendCapabilities = []) throws(NPTError) {
        platformBox = Mutex(try PersistentPlatform(platform))
        self.name = name
        capabilities = SimulatorBackend.allCapabilities.subtracting(withoutExits.intersection([.exitOnEscalation, .exitOnReturn, .linearModeInfo]))
        var s = "built-in simulator: guest ISA interpreter, real 2-D page walk, hierarchy-tagged TLB, persistent-memory platform"
        if !withoutExits.isEmpty { s += "; without \(withoutExits.names.map { $0.split(separator: " ").first.map(String.init) ?? $0 }.joined(separator: ", "))" }
        summary = s
    }
    /// On the standard platform (which needs WPQ flushing).
    public convenience init() {
        try! self.init(platform: .standard(needsWPQFlush: true))   // valid by construction
    }

    /// The simulated host platform new VMs of this backend are created on.
    public var platform: PersistentPlatform { platformBox.withLock { $0 } }

    /// Replaces the host platform for VMs created from now on (a VM keeps the platform it was
    /// created on); refused while a VM has NVDIMM ranges on the current one.
    public func setPlatform(_ d: PlatformDescription) throws(NPTError) {
        let p = try PersistentPlatform(d)
        let busy = platformBox.withLock { cur -> Int in
            let n = cur.attachedVMs
            if n == 0 { cur = p }
            return n
        }
        if busy > 0 { throw NPTError(.busy, "\(busy) VM(s) have NVDIMM ranges on the current platform") }
    }

    public func hostPersistence() throws(NPTError) -> HostPersistence { platform.description.persistence }

    public func makeVM(config: VMConfig, hierarchies: any HierarchyProvider, handle: UnsafeMutableRawPointer?) throws(NPTError) -> any BackendVM {
        try SimVM(config: config, hierarchies: hierarchies, platform: platform, capabilities: capabilities)
    }
}

/// Guest RAM: an anonymous, lazily backed mapping, so a 64 GiB guest costs only what it touches.
final class GuestRAM: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let size: UInt64
    init(size: UInt64) throws(NPTError) {
        let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else {
            throw NPTError(.backend, "cannot map \(size) bytes of guest RAM (errno \(errno))")
        }
        base = p
        self.size = size
    }
    deinit { munmap(base, Int(size)) }
}

public final class SimVM: BackendVM {
    let ram: GuestRAM
    let config: VMConfig
    let hierarchies: any HierarchyProvider
    private let vcpus = Mutex<[ObjectIdentifier: SimVCPU]>([:])
    /// Backing memory for the privileged-mode region starts at the first 1 GiB boundary past RAM.
    let regionWindow: UInt64
    /// The vCPU the region is visible to (-1: not visible), for the invariant check below.
    let visibleHolder = Atomic<Int64>(-1)
    /// Instructions retired by a vCPU outside the privileged mode while the region was visible:
    /// the security invariant says this stays 0.
    let outsideCounter = Atomic<UInt64>(0)
    public var outsideWhileVisible: UInt64 { outsideCounter.load(ordering: .relaxed) }

    // Persistent memory. Backing layout past RAM (the core chooses the offsets): the region's
    // 1 GiB window, then the vFHA's scratch page, then NVDIMM windows (at most `pmemWindow` bytes).
    static let pmemWindow: UInt64 = 64 << 30
    let platform: PersistentPlatform
    struct PMemWindow: Sendable {
        var gpa: GPARange
        var hostOffset: UInt64
        var spa: UInt64
        var region: UInt32
        var regionOffset: UInt64
    }
    let pmem = Mutex<[PMemWindow]>([])
    /// Host offset of the vFHA's scratch page (UInt64.max: none).
    let flushHintHost = Atomic<UInt64>(.max)
    let untrapped = Atomic<UInt64>(0)
    public var untrappedFlushHintWrites: UInt64 { untrapped.load(ordering: .relaxed) }

    let capabilities: BackendCapabilities

    init(config: VMConfig, hierarchies: any HierarchyProvider, platform: PersistentPlatform,
         capabilities: BackendCapabilities) throws(NPTError) {
        self.capabilities = capabilities
        self.config = config
        self.hierarchies = hierarchies
        self.platform = platform
        regionWindow = (config.ramSize + PageSize.size1G.bytes - 1) / PageSize.size1G.bytes * PageSize.size1G.bytes
        ram = try GuestRAM(size: regionWindow + 2 * PageSize.size1G.bytes + SimVM.pmemWindow)
    }

    /// The platform this VM was created on (a later `setPlatform` gives only new VMs another one).
    public var hostPersistence: HostPersistence? { platform.description.persistence }

    public func attachPersistentMemory(_ range: GPARange, region: UInt32, regionOffset: UInt64, hostOffset: UInt64) throws(NPTError) {
        guard let r = platform.region(region) else { throw NPTError(.notFound, "the platform has no region \(region)") }
        guard regionOffset + range.size <= r.size else {
            throw NPTError(.outOfRange, "region \(region) offset \(hex(regionOffset)) + \(hex(range.size)) is past its end")
        }
        guard hostOffset >= regionWindow + 2 * PageSize.size1G.bytes, hostOffset + range.size <= ram.size else {
            throw NPTError(.outOfRange, "the simulator backs at most \(SimVM.pmemWindow >> 30) GiB of NVDIMM ranges per VM")
        }
        // Attached again at the same GPA: the core forgot the earlier attachment (a later step of
        // adding that range failed), so this one replaces it.
        let stale = pmem.withLock { ws -> PMemWindow? in
            guard let i = ws.firstIndex(where: { $0.gpa.start == range.start }) else { return nil }
            return ws.remove(at: i)
        }
        if let stale { platform.unclaim(ObjectIdentifier(self), region: stale.region, offset: stale.regionOffset) }
        try platform.claim(ObjectIdentifier(self), region: region, offset: regionOffset, size: range.size)
        let w = PMemWindow(gpa: range, hostOffset: hostOffset, spa: r.base + regionOffset, region: region, regionOffset: regionOffset)
        // The VM sees what the media holds.
        platform.loadMedia(spa: w.spa, len: range.size, into: ram.base + Int(hostOffset))
        pmem.withLock { $0.append(w) }
        platform.attach(ObjectIdentifier(self)) { [weak self] in self?.reloadFromMedia() }
    }

    private func reloadFromMedia() {
        for w in pmem.withLock({ $0 }) { platform.loadMedia(spa: w.spa, len: w.gpa.size, into: ram.base + Int(w.hostOffset)) }
    }

    public func defineFlushHintPage(_ gpa: GPA, hostOffset: UInt64, trapped: Bool) throws(NPTError) {
        guard hostOffset >= regionWindow, hostOffset + 0x1000 <= ram.size else {
            throw NPTError(.outOfRange, "flush hint page \(hex(hostOffset)) is outside the simulator's window")
        }
        if flushHintHost.load(ordering: .relaxed) != hostOffset {
            (ram.base + Int(hostOffset)).initializeMemory(as: UInt8.self, repeating: 0, count: 0x1000)
        }
        flushHintHost.store(hostOffset, ordering: .releasing)
    }

    public func physicalFlush(region: UInt32, target: HostPersistence.FlushTarget) throws(NPTError) {
        try platform.physicalFlush(controller: target.controller, address: target.address)
    }

    public func powerFailure() throws(NPTError) {
        guard !pmem.withLock({ $0.isEmpty }) else { throw NPTError(.state, "the VM has no NVDIMM range") }
        platform.powerFailure()
    }

    /// The persistent-memory window holding host offset `h`, with the system-physical address.
    @inline(__always) func pmemSPA(_ h: UInt64) -> UInt64? {
        pmem.withLock { ws in
            for w in ws where h >= w.hostOffset && h < w.hostOffset + w.gpa.size { return w.spa + (h - w.hostOffset) }
            return nil
        }
    }

    /// Where `gpa` of an NVDIMM range lives in the backing memory.
    func pmemHost(_ gpa: UInt64, _ len: Int) -> UInt64? {
        pmem.withLock { ws in
            for w in ws where gpa >= w.gpa.start.raw && gpa + UInt64(len) <= w.gpa.end { return w.hostOffset + (gpa - w.gpa.start.raw) }
            return nil
        }
    }

    public func defineRegion(_ range: GPARange, hostOffset: UInt64, contents: UnsafeRawBufferPointer) throws(NPTError) {
        guard hostOffset >= regionWindow, hostOffset + range.size <= ram.size else {
            throw NPTError(.outOfRange, "region backing \(hex(hostOffset)) +\(hex(range.size)) is outside the simulator's window")
        }
        let dst = ram.base + Int(hostOffset)
        dst.initializeMemory(as: UInt8.self, repeating: 0, count: Int(range.size))
        if let src = contents.baseAddress { dst.copyMemory(from: src, byteCount: contents.count) }
    }

    public func backendStatistics() throws(NPTError) -> [BackendStatistic] {
        [BackendStatistic(name: BackendStatistic.outsideWhileVisible, value: outsideWhileVisible),
         BackendStatistic(name: "untrapped_flush_hint_writes", value: untrappedFlushHintWrites),
         BackendStatistic(name: "nvdimm_ranges", value: UInt64(pmem.withLock { $0.count })),
         BackendStatistic(name: "vcpus", value: UInt64(vcpus.withLock { $0.count }))]
    }

    public func regionVisibility(holder: UInt32?) {
        visibleHolder.store(holder.map { Int64($0) } ?? -1, ordering: .sequentiallyConsistent)
    }

    public func writeMemory(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(NPTError) {
        guard gpa.raw + UInt64(bytes.count) <= config.ramSize else { throw NPTError(.outOfRange, "write past RAM") }
        if let src = bytes.baseAddress { (ram.base + Int(gpa.raw)).copyMemory(from: src, byteCount: bytes.count) }
    }

    public func readMemory(_ gpa: GPA, _ into: UnsafeMutableRawBufferPointer) throws(NPTError) {
        var host = gpa.raw
        if gpa.raw + UInt64(into.count) > config.ramSize {
            guard let h = pmemHost(gpa.raw, into.count) else { throw NPTError(.outOfRange, "read past RAM and the NVDIMM ranges") }
            host = h
        }
        if let dst = into.baseAddress { dst.copyMemory(from: ram.base + Int(host), byteCount: into.count) }
    }

    public func invalidate(_ inv: Invalidation) throws(NPTError) {
        for v in vcpus.withLock({ Array($0.values) }) { v.post(inv) }
    }

    public func makeVCPU(index: UInt32) throws(NPTError) -> any BackendVCPU {
        let v = SimVCPU(vm: self, index: index)   // reads the current hierarchies
        testHookBeforeListing?()
        vcpus.withLock { $0[ObjectIdentifier(v)] = v }
        return v
    }

    /// Test hook: runs inside `makeVCPU` after the new vCPU read the hierarchies and before it is
    /// listed for invalidations (the window in which a policy update would miss it).
    nonisolated(unsafe) public var testHookBeforeListing: (@Sendable () -> Void)?

    func remove(_ v: SimVCPU) { _ = vcpus.withLock { $0.removeValue(forKey: ObjectIdentifier(v)) } }

    private let destroyed = Atomic<Bool>(false)

    public func destroy() {
        guard !destroyed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        vcpus.withLock { $0.removeAll() }
        platform.detach(ObjectIdentifier(self))
    }
    deinit { destroy() }
}
