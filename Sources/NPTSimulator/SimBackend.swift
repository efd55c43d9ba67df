import NPTCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The built-in simulator backend: a small guest ISA (docs/guest-isa.md) interpreted over a real
/// two-dimensional page walk (guest 4-level paging, then the exposed shadow hierarchy), with a
/// per-vCPU TLB tagged by hierarchy. Deterministic: the same inputs give the same exits.
public final class SimulatorBackend: Backend {
    public let name = "sim"
    public let summary = "built-in simulator: guest ISA interpreter, real 2-D page walk, hierarchy-tagged TLB"
    public let capabilities: BackendCapabilities = [.mbecEmulation, .exitOnEscalation, .exitOnReturn, .linearModeInfo, .run, .privilegedMode]
    public init() {}

    public func makeVM(config: VMConfig, hierarchies: any HierarchyProvider, handle: UnsafeMutableRawPointer?) throws(NPTError) -> any BackendVM {
        try SimVM(config: config, hierarchies: hierarchies)
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

    init(config: VMConfig, hierarchies: any HierarchyProvider) throws(NPTError) {
        self.config = config
        self.hierarchies = hierarchies
        regionWindow = (config.ramSize + PageSize.size1G.bytes - 1) / PageSize.size1G.bytes * PageSize.size1G.bytes
        ram = try GuestRAM(size: regionWindow + PageSize.size1G.bytes)
    }

    public func defineRegion(_ range: GPARange, hostOffset: UInt64, contents: UnsafeRawBufferPointer) throws(NPTError) {
        guard hostOffset >= regionWindow, hostOffset + range.size <= ram.size else {
            throw NPTError(.outOfRange, "region backing \(hex(hostOffset)) +\(hex(range.size)) is outside the simulator's window")
        }
        let dst = ram.base + Int(hostOffset)
        dst.initializeMemory(as: UInt8.self, repeating: 0, count: Int(range.size))
        if let src = contents.baseAddress { dst.copyMemory(from: src, byteCount: contents.count) }
    }

    public func regionVisibility(holder: UInt32?) {
        visibleHolder.store(holder.map { Int64($0) } ?? -1, ordering: .sequentiallyConsistent)
    }

    public func writeMemory(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(NPTError) {
        guard gpa.raw + UInt64(bytes.count) <= config.ramSize else { throw NPTError(.outOfRange, "write past RAM") }
        if let src = bytes.baseAddress { (ram.base + Int(gpa.raw)).copyMemory(from: src, byteCount: bytes.count) }
    }

    public func readMemory(_ gpa: GPA, _ into: UnsafeMutableRawBufferPointer) throws(NPTError) {
        guard gpa.raw + UInt64(into.count) <= config.ramSize else { throw NPTError(.outOfRange, "read past RAM") }
        if let dst = into.baseAddress { dst.copyMemory(from: ram.base + Int(gpa.raw), byteCount: into.count) }
    }

    public func invalidate(_ inv: Invalidation) throws(NPTError) {
        for v in vcpus.withLock({ Array($0.values) }) { v.post(inv) }
    }

    public func makeVCPU(index: UInt32) throws(NPTError) -> any BackendVCPU {
        let v = SimVCPU(vm: self, index: index)
        vcpus.withLock { $0[ObjectIdentifier(v)] = v }
        return v
    }

    func remove(_ v: SimVCPU) { _ = vcpus.withLock { $0.removeValue(forKey: ObjectIdentifier(v)) } }

    public func destroy() { vcpus.withLock { $0.removeAll() } }
}
