#if canImport(Glibc)
import Glibc
#endif

/// Whether the host's persistent memory needs write-pending-queue flushing, and where its physical
/// flush hints are. The one host discovery of NPTKit: the core uses it for every source, and the KVM
/// plugin reaches the sysfs discovery through the C ABI (`npt_host_api.host_pmem_discover_sysfs`,
/// the same code as `npt_host_pmem_discover_sysfs`) instead of reading sysfs itself.
///
/// The rule: a region needs WPQ flushing when it has flush hints AND its persistence domain does not
/// hold the WPQs (`Domain.media`).
/// - NFIT: the region (a persistent-memory SPA range) has flush hints when some DIMM mapped into it
///   (a memory-device map whose `spaRangeIndex` is the range's index) has a Flush Hint Address
///   structure with at least one address. The domain comes from the Platform Capabilities
///   structure, bits counted only up to the highest valid capability, as Linux's nfit driver reads
///   it: bit 0 (CPU cache flush on power loss) gives `.cpuCache`, else bit 1 (memory controller flush
///   on power loss, ADR) gives `.memoryController`, else (or without the structure) `.media`.
/// - sysfs: the region has flush hints when its `deep_flush` file reads "1"; the domain is what its
///   `persistence_domain` file names ("cpu_cache", "memory_controller"); absent, empty or anything
///   else is `.media` (the safe reading: an unknown word never makes NPTKit skip a flush).
///
/// Region ids (the one numbering rule, per source): NFIT: the SPA range structure index (never 0);
/// sysfs: N of the directory `regionN` (what the kernel numbered it, 0 included; unique for a
/// boot, not across boots, so a tool that keeps configuration should match regions by base
/// address); simulator: its platform's region ids; a C backend: what its `host_pmem_get` reports.
public struct HostPersistence: Equatable, Sendable {
    public struct FlushTarget: Hashable, Sendable {
        /// Memory-controller key (`NFIT.DeviceHandle.controllerKey`, or an index for other sources).
        public var controller: UInt32
        /// Physical flush hint address; 0 when the source does not give one (sysfs).
        public var address: UInt64
        public init(controller: UInt32, address: UInt64) { self.controller = controller; self.address = address }
    }

    /// Where a power failure stops losing data (Linux's `persistence_domain`; NFIT platform
    /// capabilities bits 0 and 1). Raw values are the C ABI's `NPT_PMEM_DOMAIN_*`.
    public enum Domain: UInt32, Sendable, CustomStringConvertible {
        /// Only the media: the WPQs (and caches) are lost at a power failure.
        case media = 0
        /// ADR: the memory controllers drain their WPQs at a power failure.
        case memoryController = 1
        /// The CPU caches are flushed too (implies `memoryController`).
        case cpuCache = 2
        /// Whether the WPQs are inside the persistence domain.
        public var holdsWPQ: Bool { self != .media }
        public var description: String {
            switch self {
            case .media: return "media"
            case .memoryController: return "memory_controller"
            case .cpuCache: return "cpu_cache"
            }
        }
    }

    public struct Region: Equatable, Sendable {
        /// See the numbering rule in the type's doc comment.
        public var id: UInt32
        /// The system-physical range.
        public var base: UInt64
        public var size: UInt64
        /// Controller keys behind the region, sorted, unique.
        public var controllers: [UInt32]
        /// One per controller that has flush hints, sorted by controller. NFIT: the first hint address
        /// of the first DIMM (lowest device handle, among that controller's DIMMs in this region that
        /// have hints). sysfs: when `deep_flush` reads "1", one per controller with address 0 (a
        /// physical flush writes the region's `deep_flush`).
        public var flushTargets: [FlushTarget]
        public var needsWPQFlush: Bool
        /// sysfs: path of the region's `deep_flush` file (writing "1" flushes), when it exists.
        public var deepFlushPath: String?
        public var domain: Domain

        public init(id: UInt32, base: UInt64, size: UInt64, controllers: [UInt32] = [],
                    flushTargets: [FlushTarget] = [], needsWPQFlush: Bool = false, deepFlushPath: String? = nil,
                    domain: Domain = .media) {
            self.id = id; self.base = base; self.size = size; self.controllers = controllers
            self.flushTargets = flushTargets; self.needsWPQFlush = needsWPQFlush; self.deepFlushPath = deepFlushPath
            self.domain = domain
        }
    }

    public var regions: [Region]
    /// "nfit", "sysfs", "simulator", or "backend 'NAME'" (an `npt_backend_ops` backend's own discovery).
    public var source: String
    /// Whether any region needs WPQ flushing.
    public var needsWPQFlush: Bool { regions.contains { $0.needsWPQFlush } }

    public init(regions: [Region], source: String) { self.regions = regions; self.source = source }

    /// The persistence domain an NFIT's platform capabilities give (see the type's doc comment).
    public static func domain(of caps: NFIT.PlatformCapabilities?) -> Domain {
        guard let caps else { return .media }
        if caps.cacheFlushOnPowerLoss { return .cpuCache }
        if caps.memoryControllerFlushOnPowerLoss { return .memoryController }
        return .media
    }

    // MARK: NFIT

    /// The persistent-memory regions of an NFIT (SPA ranges whose type GUID is
    /// `NFIT.persistentMemoryGUID`), sorted by SPA range index. See the type's doc comment for the rule.
    /// The persistent-memory ranges of a platform must be usable as one system-physical map: each
    /// non-empty, 4 KiB aligned in base and size, not wrapping past 2^64, none overlapping another.
    /// (An NFIT that breaks this was accepted and made later arithmetic on the ranges overflow.)
    public static func checkRanges(_ ranges: [(id: UInt32, base: UInt64, size: UInt64)], source: String) throws(NPTError) {
        for r in ranges {
            if r.size == 0 { throw .invalid("\(source): persistent-memory range \(r.id) has size 0") }
            if r.base % 4096 != 0 || r.size % 4096 != 0 {
                throw .invalid("\(source): persistent-memory range \(r.id) [\(hex(r.base)), +\(hex(r.size))) is not 4 KiB aligned")
            }
            if r.base.addingReportingOverflow(r.size).overflow {
                throw .invalid("\(source): persistent-memory range \(r.id) [\(hex(r.base)), +\(hex(r.size))) wraps past 2^64")
            }
        }
        let sorted = ranges.sorted { $0.base < $1.base }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.base + a.size > b.base {
            throw .invalid("\(source): persistent-memory ranges \(a.id) [\(hex(a.base)), +\(hex(a.size))) and \(b.id) [\(hex(b.base)), +\(hex(b.size))) overlap")
        }
        var ids = Set<UInt32>()
        for r in ranges where !ids.insert(r.id).inserted {
            throw .invalid("\(source): two persistent-memory ranges have index \(r.id)")
        }
    }

    /// `fromNFIT`, refusing ranges that are not one usable map (`checkRanges`).
    public static func checkedFromNFIT(_ nfit: NFIT) throws(NPTError) -> HostPersistence {
        let h = fromNFIT(nfit)
        try checkRanges(h.regions.map { ($0.id, $0.base, $0.size) }, source: "NFIT")
        return h
    }

    public static func fromNFIT(_ nfit: NFIT) -> HostPersistence {
        var hints: [UInt32: [UInt64]] = [:]
        for f in nfit.flushHints { hints[f.deviceHandle, default: []].append(contentsOf: f.addresses) }
        let domain = domain(of: nfit.platformCapabilities)
        var regions: [Region] = []
        for r in nfit.spaRanges where r.isPersistentMemory {
            let handles = Set(nfit.memoryMaps.filter { $0.spaRangeIndex == r.index }.map(\.deviceHandle)).sorted()
            let controllers = Set(handles.map { NFIT.DeviceHandle($0).controllerKey }).sorted()
            var targets: [FlushTarget] = []
            for c in controllers {
                let first = handles.first { NFIT.DeviceHandle($0).controllerKey == c && !(hints[$0] ?? []).isEmpty }
                if let h = first, let address = hints[h]?.first {
                    targets.append(FlushTarget(controller: c, address: address))
                }
            }
            regions.append(Region(id: UInt32(r.index), base: r.base, size: r.length, controllers: controllers,
                                  flushTargets: targets, needsWPQFlush: !targets.isEmpty && !domain.holdsWPQ,
                                  domain: domain))
        }
        regions.sort { $0.id < $1.id }
        return HostPersistence(regions: regions, source: "nfit")
    }

    // MARK: sysfs

    /// The libnvdimm regions under `root` (normally `/sys/bus/nd/devices`): each directory (or symlink
    /// to one) named `region<N>`, N a decimal number as the kernel writes it (no sign, no leading
    /// zero unless N is 0, at most UInt32.max; other names, such as `regionX` or `region01`, and
    /// plain files are not regions), read as in the kernel's drivers/nvdimm/region_devs.c:
    /// `resource` (hex start), `size` (decimal), `deep_flush` ("0"/"1", may be absent),
    /// `persistence_domain` (may be absent or empty), `mappings` (count) and `mappingK`
    /// ("nmemX,offset,length,position"); the controller of each mapping comes from
    /// `root/nmemX/nfit/handle` (an NFIT device handle; a DIMM without one contributes no
    /// controller). A region with flush hints none of whose DIMMs has a handle (a bus other than
    /// ACPI NFIT, e.g. virtio-pmem) has one controller, key 0, so that it has a flush target.
    /// Regions are sorted by id (= N).
    /// See the type's doc comment for the rule.
    ///
    /// Throws `.notFound` when `root` is not a readable directory, and `.invalidArgument` naming the
    /// file and its content when a region's `resource`, `size`, `mappings`, `mappingK` or a DIMM's
    /// `handle` is missing (where required) or malformed.
    public static func fromSysfs(root: String = defaultSysfsRoot) throws(NPTError) -> HostPersistence {
        guard let names = listDirectory(root) else {
            throw NPTError(.notFound, "sysfs: cannot open directory \(root) (errno \(errno))")
        }
        var regions: [Region] = []
        for name in names {
            guard let id = sysfsRegionNumber(name) else { continue }
            let dir = root + "/" + name
            guard isDirectory(dir) else { continue }
            regions.append(try readRegion(id: id, dir: dir, root: root))
        }
        regions.sort { $0.id < $1.id }
        return HostPersistence(regions: regions, source: "sysfs")
    }

    /// Where Linux lists libnvdimm devices.
    public static let defaultSysfsRoot = "/sys/bus/nd/devices"

    /// N for a directory name `region<N>` as the kernel names regions (see `fromSysfs`), else nil.
    public static func sysfsRegionNumber(_ name: String) -> UInt32? {
        guard name.hasPrefix("region") else { return nil }
        let digits = name.utf8.dropFirst("region".utf8.count)
        guard let first = digits.first, digits.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) else {
            return nil
        }
        if first == UInt8(ascii: "0") && digits.count > 1 { return nil }
        return UInt32(Substring(name.dropFirst("region".count)))
    }

    /// The persistence domain a region's `persistence_domain` file names (nil: no such file).
    public static func sysfsDomain(_ content: String?) -> Domain {
        switch content.map({ String(trimmed($0)) }) {
        case "cpu_cache": return .cpuCache
        case "memory_controller": return .memoryController
        default: return .media
        }
    }

    private static func readRegion(id: UInt32, dir: String, root: String) throws(NPTError) -> Region {
        let base = try requiredNumber(dir + "/resource", hexadecimal: true)
        let size = try requiredNumber(dir + "/size", hexadecimal: false)
        var handles = Set<UInt32>()
        if let m = readSmallFile(dir + "/mappings") {
            guard let count = UInt32(trimmed(m)) else {
                throw .invalid("sysfs: \(dir)/mappings holds \(quoted(m)), not a decimal count")
            }
            for k in 0..<count {
                let path = dir + "/mapping\(k)"
                guard let line = readSmallFile(path) else {
                    throw .invalid("sysfs: \(path) is missing although \(dir)/mappings says \(count)")
                }
                let fields = trimmed(line).split(separator: ",", omittingEmptySubsequences: false)
                guard fields.count >= 3, fields[0].hasPrefix("nmem"), !fields[0].contains("/") else {
                    throw .invalid("sysfs: \(path) holds \(quoted(line)), not \"nmemX,offset,length[,position]\"")
                }
                let handlePath = root + "/" + fields[0] + "/nfit/handle"
                guard let h = readSmallFile(handlePath) else { continue }
                guard let v = parseNumber(h, hexadecimal: true), v <= UInt64(UInt32.max) else {
                    throw .invalid("sysfs: \(handlePath) holds \(quoted(h)), not a hexadecimal NFIT device handle")
                }
                handles.insert(UInt32(v))
            }
        }
        var controllers = Set(handles.map { NFIT.DeviceHandle($0).controllerKey }).sorted()
        let deepFlushFile = dir + "/deep_flush"
        let deepFlush = readSmallFile(deepFlushFile)
        let hasFlush = deepFlush.map { trimmed($0) == "1" } ?? false
        // Flush hints but no DIMM with an NFIT handle: one controller (key 0) for its deep_flush, so
        // that a region that needs flushing always has a flush target.
        if controllers.isEmpty && hasFlush { controllers = [0] }
        let domain = sysfsDomain(readSmallFile(dir + "/persistence_domain"))
        return Region(id: id, base: base, size: size, controllers: controllers,
                      flushTargets: hasFlush ? controllers.map { FlushTarget(controller: $0, address: 0) } : [],
                      needsWPQFlush: hasFlush && !domain.holdsWPQ,
                      deepFlushPath: deepFlush == nil ? nil : deepFlushFile, domain: domain)
    }

    private static func requiredNumber(_ path: String, hexadecimal: Bool) throws(NPTError) -> UInt64 {
        guard let s = readSmallFile(path) else { throw .invalid("sysfs: \(path) is missing or unreadable") }
        guard let v = parseNumber(s, hexadecimal: hexadecimal) else {
            throw .invalid("sysfs: \(path) holds \(quoted(s)), not a \(hexadecimal ? "hexadecimal address" : "decimal size")")
        }
        return v
    }
}

// MARK: File helpers (Glibc, no Foundation)

/// The names in a directory (without "." and ".."), or nil when it cannot be opened.
private func listDirectory(_ path: String) -> [String]? {
    guard let d = opendir(path) else { return nil }
    defer { closedir(d) }
    var names: [String] = []
    while let e = readdir(d) {
        let name = withUnsafePointer(to: &e.pointee.d_name) {
            $0.withMemoryRebound(to: CChar.self, capacity: MemoryLayout.size(ofValue: e.pointee.d_name)) {
                String(cString: $0)
            }
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return names
}

/// Whether `path` is a directory, following symlinks.
private func isDirectory(_ path: String) -> Bool {
    var st = stat()
    guard stat(path, &st) == 0 else { return false }
    return st.st_mode & S_IFMT == S_IFDIR
}

/// The contents of a small file (at most 64 KiB are read), or nil when it cannot be opened or read.
private func readSmallFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while out.count < 65536 {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { if errno == EINTR { continue }; return nil }
        if n == 0 { break }
        out.append(contentsOf: buf[0..<n])
    }
    return String(decoding: out, as: UTF8.self)
}

private func trimmed(_ s: String) -> Substring {
    let ws: (Character) -> Bool = { $0 == " " || $0 == "\n" || $0 == "\t" || $0 == "\r" || $0 == "\0" }
    guard let first = s.firstIndex(where: { !ws($0) }), let last = s.lastIndex(where: { !ws($0) }) else { return "" }
    return s[first...last]
}

/// A number as the kernel prints it: `%#llx` ("0x1f", or "0" for zero) or `%llu`.
private func parseNumber(_ s: String, hexadecimal: Bool) -> UInt64? {
    var t = trimmed(s)
    if hexadecimal {
        if t.hasPrefix("0x") || t.hasPrefix("0X") { t = t.dropFirst(2) }
        guard !t.isEmpty, t.allSatisfy(\.isHexDigit) else { return nil }
        return UInt64(t, radix: 16)
    }
    guard !t.isEmpty, t.allSatisfy({ $0 >= "0" && $0 <= "9" }) else { return nil }
    return UInt64(t)
}

private func quoted(_ s: String) -> String {
    let limit = 64
    var t = ""
    for c in s.unicodeScalars.prefix(limit) { t += c.escaped(asASCII: true) }
    return "\"" + t + (s.unicodeScalars.count > limit ? "..." : "") + "\""
}
