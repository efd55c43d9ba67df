import NPTCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The built-in simulator backend: a small guest ISA (docs/guest-isa.md) interpreted over a real
/// two-dimensional page walk (guest 4-level paging, then the exposed shadow hierarchy), with a
/// per-vCPU TLB tagged by hierarchy. Deterministic: the same inputs give the same exits.
package final class SimulatorBackend: Backend {
    package let name: String
    package let summary: String
    package let capabilities: BackendCapabilities
    package var guestISA: GuestISA { .simulator }
    package static let allCapabilities: BackendCapabilities = [.mbecEmulation, .exitOnEscalation, .exitOnReturn, .linearModeInfo, .run,
                                                              .privilegedMode, .persistentMemory]
    private let platformBox: NPTMutex<PersistentPlatform>

    /// `platform`: the simulated host's persistent memory (refused if inconsistent).
    /// `withoutExits`: capabilities the simulator pretends not to have (e.g. `.exitOnEscalation` to
    /// behave like a backend without privilege-change exits); it then never takes those exits.
    package init(platform: PlatformDescription = .standard(needsWPQFlush: true), name: String = "sim",
                withoutExits: BackendCapabilities = []) throws(NPTError) {
        platformBox = NPTMutex(try PersistentPlatform(platform))
        self.name = name
        capabilities = SimulatorBackend.allCapabilities.subtracting(withoutExits.intersection([.exitOnEscalation, .exitOnReturn, .linearModeInfo]))
        var s = "built-in simulator: guest ISA interpreter, real 2-D page walk, hierarchy-tagged TLB, persistent-memory platform"
        if !withoutExits.isEmpty { s += "; without \(withoutExits.names.map { $0.split(separator: " ").first.map(String.init) ?? $0 }.joined(separator: ", "))" }
        summary = s
    }
    /// On the standard platform (which needs WPQ flushing).
    package convenience init() {
        try! self.init(platform: .standard(needsWPQFlush: true))   // valid by construction
    }

    /// The simulated host platform new VMs of this backend are created on.
    package var platform: PersistentPlatform { platformBox.withLock { $0 } }

    /// Replaces the host platform for VMs created from now on (a VM keeps the platform it was
    /// created on); refused while a VM has NVDIMM ranges on the current one.
    package func setPlatform(_ d: PlatformDescription) throws(NPTError) {
        let p = try PersistentPlatform(d)
        let busy = platformBox.withLock { cur -> Int in
            let n = cur.attachedVMs
            if n == 0 { cur = p }
            return n
        }
        if busy > 0 { throw NPTError(.busy, "\(busy) VM(s) have NVDIMM ranges on the current platform") }
    }

    package func hostPersistence() throws(NPTError) -> HostPersistence { platform.description.persistence }

    package func makeVM(config: VMConfig, hierarchies: any HierarchyProvider, handle: UnsafeMutableRawPointer?) throws(NPTError) -> any BackendVM {
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

/// Backing memory past RAM (the privileged-mode region, the vFHA's scratch page, an NVDIMM
/// range): its own mapping at host offset `start`, the size of what it backs.
final class Segment: @unchecked Sendable {
    let start: UInt64
    let mem: GuestRAM
    init(start: UInt64, size: UInt64) throws(NPTError) { self.start = start; mem = try GuestRAM(size: size) }
    @inline(__always) func contains(_ h: UInt64, _ len: UInt64) -> Bool {
        h >= start && h - start <= mem.size && len <= mem.size - (h - start)
    }
}

package final class SimVM: BackendVM {
    /// Guest RAM only. What lies past it is in `segments`: the address space a VM reserves is its
    /// memory, not a fixed window (each VM reserved 67 GiB, and the 1,955th VM could not be mapped).
    let ram: GuestRAM
    private let segmentBox = NPTMutex<[Segment]>([])
    /// Bumped after every change of `segments` (vCPUs keep a copy and refresh it when it moves).
    let segmentsVersion = Atomic<UInt64>(0)
    /// Where an access to backing that does not exist goes (nothing maps it; a guard).
    let voidPage: GuestRAM
    let config: VMConfig
    let hierarchies: any HierarchyProvider
    private let vcpus = NPTMutex<[ObjectIdentifier: SimVCPU]>([:])
    /// Backing memory for the privileged-mode region starts at the first 1 GiB boundary past RAM.
    let regionWindow: UInt64
    /// The vCPU the region is visible to (-1: not visible), for the invariant check below.
    let visibleHolder = Atomic<Int64>(-1)
    /// Instructions retired by a vCPU outside the privileged mode while the region was visible:
    /// the security invariant says this stays 0.
    let outsideCounter = Atomic<UInt64>(0)
    package var outsideWhileVisible: UInt64 { outsideCounter.load(ordering: .relaxed) }

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
    let pmem = NPTMutex<[PMemWindow]>([])
    /// Host offset of the vFHA's scratch page (UInt64.max: none).
    let flushHintHost = Atomic<UInt64>(.max)
    let untrapped = Atomic<UInt64>(0)
    package var untrappedFlushHintWrites: UInt64 { untrapped.load(ordering: .relaxed) }

    let capabilities: BackendCapabilities

    init(config: VMConfig, hierarchies: any HierarchyProvider, platform: PersistentPlatform,
         capabilities: BackendCapabilities) throws(NPTError) {
        self.capabilities = capabilities
        self.config = config
        self.hierarchies = hierarchies
        self.platform = platform
        regionWindow = (config.ramSize + PageSize.size1G.bytes - 1) / PageSize.size1G.bytes * PageSize.size1G.bytes
        ram = try GuestRAM(size: config.ramSize)
        voidPage = try GuestRAM(size: 0x1000)
    }

    /// The end of the host offsets the core may use (region window, scratch page, NVDIMM windows).
    var backingLimit: UInt64 { regionWindow + 2 * PageSize.size1G.bytes + SimVM.pmemWindow }

    var segments: [Segment] { segmentBox.withLock { $0 } }

    /// Maps `size` bytes of backing at host offset `start`, replacing a segment that starts there.
    @discardableResult
    func setSegment(start: UInt64, size: UInt64) throws(NPTError) -> Segment {
        let seg = try Segment(start: start, size: size)
        segmentBox.withLock { list in
            list.removeAll { $0.start == start }
            list.append(seg)
        }
        segmentsVersion.wrappingAdd(1, ordering: .releasing)
        return seg
    }

    func removeSegment(start: UInt64) {
        segmentBox.withLock { $0.removeAll { $0.start == start } }
        segmentsVersion.wrappingAdd(1, ordering: .releasing)
    }

    /// Backing memory for [h, h + len): RAM or one segment; nil where there is none.
    func pointer(_ h: UInt64, _ len: UInt64) -> UnsafeMutableRawPointer? {
        if h < ram.size && len <= ram.size - h { return ram.base + Int(h) }
        for s in segments where s.contains(h, len) { return s.mem.base + Int(h - s.start) }
        return nil
    }

    /// The platform this VM was created on (a later `setPlatform` gives only new VMs another one).
    package var hostPersistence: HostPersistence? { platform.description.persistence }

    package func attachPersistentMemory(_ range: GPARange, region: UInt32, regionOffset: UInt64, hostOffset: UInt64) throws(NPTError) {
        guard let r = platform.region(region) else { throw NPTError(.notFound, "the platform has no region \(region)") }
        guard regionOffset + range.size <= r.size else {
            throw NPTError(.outOfRange, "region \(region) offset \(hex(regionOffset)) + \(hex(range.size)) is past its end")
        }
        guard hostOffset >= regionWindow + 2 * PageSize.size1G.bytes, !hostOffset.addingReportingOverflow(range.size).overflow,
              hostOffset + range.size <= backingLimit else {
            throw NPTError(.outOfRange, "the simulator backs at most \(SimVM.pmemWindow >> 30) GiB of NVDIMM ranges per VM")
        }
        // Attached again at the same GPA: the core forgot the earlier attachment (a later step of
        // adding that range failed), so this one replaces it.
        let stale = pmem.withLock { ws -> PMemWindow? in
            guard let i = ws.firstIndex(where: { $0.gpa.start == range.start }) else { return nil }
            return ws.remove(at: i)
        }
        if let stale {
            platform.unclaim(ObjectIdentifier(self), region: stale.region, offset: stale.regionOffset)
            removeSegment(start: stale.hostOffset)
        }
        try platform.claim(ObjectIdentifier(self), region: region, offset: regionOffset, size: range.size)
        let seg: Segment
        do { seg = try setSegment(start: hostOffset, size: range.size) } catch {
            platform.unclaim(ObjectIdentifier(self), region: region, offset: regionOffset)
            throw error
        }
        let w = PMemWindow(gpa: range, hostOffset: hostOffset, spa: r.base + regionOffset, region: region, regionOffset: regionOffset)
        // The VM sees what the media holds.
        platform.loadMedia(spa: w.spa, len: range.size, into: seg.mem.base)
        pmem.withLock { $0.append(w) }
        platform.attach(ObjectIdentifier(self)) { [weak self] in self?.reloadFromMedia() }
    }

    private func reloadFromMedia() {
        for w in pmem.withLock({ $0 }) {
            if let p = pointer(w.hostOffset, w.gpa.size) { platform.loadMedia(spa: w.spa, len: w.gpa.size, into: p) }
        }
    }

    package func defineFlushHintPage(_ gpa: GPA, hostOffset: UInt64, trapped: Bool) throws(NPTError) {
        guard hostOffset >= regionWindow, hostOffset % 0x1000 == 0, hostOffset < backingLimit else {
            throw NPTError(.outOfRange, "flush hint page \(hex(hostOffset)) is outside the simulator's window")
        }
        if flushHintHost.load(ordering: .relaxed) != hostOffset {
            if let old = Optional(flushHintHost.load(ordering: .relaxed)), old != .max { removeSegment(start: old) }
            try setSegment(start: hostOffset, size: 0x1000)   // zero-filled
        }
        flushHintHost.store(hostOffset, ordering: .releasing)
    }

    package func physicalFlush(region: UInt32, target: HostPersistence.FlushTarget) throws(NPTError) {
        try platform.physicalFlush(controller: target.controller, address: target.address)
    }

    package func powerFailure() throws(NPTError) {
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

    package func defineRegion(_ range: GPARange, hostOffset: UInt64, contents: UnsafeRawBufferPointer) throws(NPTError) {
        guard hostOffset >= regionWindow, !hostOffset.addingReportingOverflow(range.size).overflow,
              hostOffset + range.size <= regionWindow + PageSize.size1G.bytes, UInt64(contents.count) <= range.size else {
            throw NPTError(.outOfRange, "region backing \(hex(hostOffset)) +\(hex(range.size)) is outside the simulator's window")
        }
        let seg = try setSegment(start: hostOffset, size: range.size)   // zero-filled
        if let src = contents.baseAddress { seg.mem.base.copyMemory(from: src, byteCount: contents.count) }
    }

    package func backendStatistics() throws(NPTError) -> [BackendStatistic] {
        [BackendStatistic(name: BackendStatistic.outsideWhileVisible, value: outsideWhileVisible),
         BackendStatistic(name: "untrapped_flush_hint_writes", value: untrappedFlushHintWrites),
         BackendStatistic(name: "nvdimm_ranges", value: UInt64(pmem.withLock { $0.count })),
         BackendStatistic(name: "vcpus", value: UInt64(vcpus.withLock { $0.count }))]
    }

    package func regionVisibility(holder: UInt32?) {
        visibleHolder.store(holder.map { Int64($0) } ?? -1, ordering: .sequentiallyConsistent)
    }

    package func writeMemory(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(NPTError) {
        guard gpa.raw < config.ramSize, UInt64(bytes.count) <= config.ramSize - gpa.raw else { throw NPTError(.outOfRange, "write past RAM") }
        if let src = bytes.baseAddress { (ram.base + Int(gpa.raw)).copyMemory(from: src, byteCount: bytes.count) }
    }

    package func readMemory(_ gpa: GPA, _ into: UnsafeMutableRawBufferPointer) throws(NPTError) {
        var host = gpa.raw
        if gpa.raw >= config.ramSize || UInt64(into.count) > config.ramSize - gpa.raw {
            guard let h = pmemHost(gpa.raw, into.count) else { throw NPTError(.outOfRange, "read past RAM and the NVDIMM ranges") }
            host = h
        }
        guard let src = pointer(host, UInt64(into.count)) else { throw NPTError(.outOfRange, "read past the VM's backing") }
        if let dst = into.baseAddress { dst.copyMemory(from: src, byteCount: into.count) }
    }

    package func invalidate(_ inv: Invalidation) throws(NPTError) {
        for v in vcpus.withLock({ Array($0.values) }) { v.post(inv) }
    }

    package func makeVCPU(index: UInt32) throws(NPTError) -> any BackendVCPU {
        let v = SimVCPU(vm: self, index: index)   // reads the current hierarchies
        testHookBeforeListing?()
        vcpus.withLock { $0[ObjectIdentifier(v)] = v }
        return v
    }

    /// Test hook: runs inside `makeVCPU` after the new vCPU read the hierarchies and before it is
    /// listed for invalidations (the window in which a policy update would miss it).
    nonisolated(unsafe) package var testHookBeforeListing: (@Sendable () -> Void)?

    func remove(_ v: SimVCPU) { _ = vcpus.withLock { $0.removeValue(forKey: ObjectIdentifier(v)) } }

    private let destroyed = Atomic<Bool>(false)

    package func destroy() {
        guard !destroyed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        vcpus.withLock { $0.removeAll() }
        platform.detach(ObjectIdentifier(self))
    }
    deinit { destroy() }
}
