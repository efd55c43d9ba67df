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
    public let capabilities: BackendCapabilities = [.mbecEmulation, .exitOnEscalation, .exitOnReturn, .linearModeInfo, .run]
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

    init(config: VMConfig, hierarchies: any HierarchyProvider) throws(NPTError) {
        self.config = config
        self.hierarchies = hierarchies
        ram = try GuestRAM(size: config.ramSize)
    }

    public func writeMemory(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(NPTError) {
        guard gpa.raw + UInt64(bytes.count) <= ram.size else { throw NPTError(.outOfRange, "write past RAM") }
        if let src = bytes.baseAddress { (ram.base + Int(gpa.raw)).copyMemory(from: src, byteCount: bytes.count) }
    }

    public func readMemory(_ gpa: GPA, _ into: UnsafeMutableRawBufferPointer) throws(NPTError) {
        guard gpa.raw + UInt64(into.count) <= ram.size else { throw NPTError(.outOfRange, "read past RAM") }
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
