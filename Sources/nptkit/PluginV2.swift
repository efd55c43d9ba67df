#if canImport(Glibc)
import Glibc
#endif

/// Everything the CLI reaches of a backend plugin around the C ABI, in this one place, until the
/// plugin interface v2 (the entry's key/value arguments, a statistics op) replaces it: each use is
/// marked `plugin v2:`. Nothing else in the CLI knows a plugin's environment variables or exports.
enum PluginV2 {
    /// The kind of host persistent-memory region the plugins are to offer (nil: leave it as it is).
    static func configure(hostPMemNeedsFlush: Bool?) {
        // plugin v2: configuration through the environment; the KVM plugin reads it at each VM's
        // first NVDIMM call (v2: the plugin's arguments).
        if let needs = hostPMemNeedsFlush { setenv("NPTKIT_KVM_PMEM_NEEDS_FLUSH", needs ? "1" : "0", 1) }
    }

    /// The counters a loaded plugin exports as `void symbol(uint64_t *, ...)` with `count`
    /// outputs (2 or 3), or nil where no loaded plugin exports it.
    static func counters(_ symbol: String, count: Int) -> [UInt64]? {
        // plugin v2: statistics through dlsym of exports nptkit.h does not declare (v2: a statistics op).
        guard let dir = executableDirectory() else { return nil }
        for path in ["\(dir)/libnptkit-kvm.so"] {
            guard let h = dlopen(path, RTLD_NOW | RTLD_NOLOAD), let f = dlsym(h, symbol) else { continue }
            var v = [UInt64](repeating: 0, count: 3)
            v.withUnsafeMutableBufferPointer { b in
                if count == 2 {
                    typealias F = @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?) -> Void
                    unsafeBitCast(f, to: F.self)(b.baseAddress, b.baseAddress! + 1)
                } else {
                    typealias F = @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?) -> Void
                    unsafeBitCast(f, to: F.self)(b.baseAddress, b.baseAddress! + 1, b.baseAddress! + 2)
                }
            }
            return Array(v.prefix(count))
        }
        return nil
    }

    /// Layout switches and memslot updates (npt_kvm_layout_stats).
    static var layoutStats: (switches: UInt64, updates: UInt64)? {
        counters("npt_kvm_layout_stats", count: 3).map { ($0[0], $0[1]) }
    }
    /// Data accesses the plugin completed, RAM and NVDIMM (npt_kvm_mmio_stats).
    static var mmioStats: UInt64? { counters("npt_kvm_mmio_stats", count: 2).map { $0[0] + $0[1] } }
    /// The privileged-mode region's memslot additions and removals and the reads of it the plugin
    /// answered with all ones (npt_kvm_region_stats).
    static var regionStats: (adds: UInt64, removes: UInt64, unbacked: UInt64)? {
        counters("npt_kvm_region_stats", count: 3).map { ($0[0], $0[1], $0[2]) }
    }
}
