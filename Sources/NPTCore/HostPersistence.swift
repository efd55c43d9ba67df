#if canImport(Glibc)
import Glibc
#endif

/// Whether the host's persistent memory needs write-pending-queue flushing, and where its physical
/// flush hints are.
///
/// The rule: a region needs WPQ flushing when it has flush hints AND the platform does not put the
/// WPQ in the persistence domain.
/// - NFIT: the region (a persistent-memory SPA range) has flush hints when some DIMM mapped into it
///   (a memory-device map whose `spaRangeIndex` is the range's index) has a Flush Hint Address
///   structure with at least one address. The WPQ is in the persistence domain when the Platform
///   Capabilities structure has bit 0 (CPU cache flush on power loss) or bit 1 (memory controller
///   flush on power loss) valid (index <= highest valid capability) and set.
/// - sysfs: the region has flush hints when its `deep_flush` file reads "1"; the WPQ is in the
///   persistence domain when its `persistence_domain` file contains "cpu_cache" or
///   "memory_controller".
public struct HostPersistence: Equatable, Sendable {
    public struct FlushTarget: Hashable, Sendable {
        /// Memory-controller key (`NFIT.DeviceHandle.controllerKey`, or an index for other sources).
        public var controller: UInt32
        /// Physical flush hint address; 0 when the source does not give one (sysfs).
        public var address: UInt64
        public init(controller: UInt32, address: UInt64) { self.controller = controller; self.address = address }
    }

    public struct Region: Equatable, Sendable {
        /// SPA range index (NFIT) or N of regionN (sysfs).
        public var id: UInt32
        /// The system-physical range.
        public var base: UInt64
        public var size: UInt64
        /// Controller keys behind the region, sorted, unique.
        public var controllers: [UInt32]
        /// One per controller that has flush hints, sorted by controller. NFIT: the first hint address
        /// of the first DIMM (lowest device handle, among that controller's DIMMs in this region that
        /// have hints). sysfs: when `deep_flush` reads "1", one per controller with address 0.
        public var flushTargets: [FlushTarget]
        public var needsWPQFlush: Bool
        /// sysfs: path of the region's `deep_flush` file (writing "1" flushes), when it exists.
        public var deepFlushPath: String?

        public init(id: UInt32, base: UInt64, size: UInt64, controllers: [UInt32] = [],
                    flushTargets: [FlushTarget] = [], needsWPQFlush: Bool = false, deepFlushPath: String? = nil) {
            self.id = id; self.base = base; self.size = size; self.controllers = controllers
            self.flushTargets = flushTargets; self.needsWPQFlush = needsWPQFlush; self.deepFlushPath = deepFlushPath
        }
    }

    public var regions: [Region]
    /// "nfit", "sysfs", "simulator", or "backend 'NAME'" (an `npt_backend_ops` backend's own discovery).
    public var source: String
    /// Whether any region needs WPQ flushing.
    public var needsWPQFlush: Bool { regions.contains { $0.needsWPQFlush } }

    public init(regions: [Region], source: String) { self.regions = regions; self.source = source }

    // MARK: NFIT

    /// The persistent-memory regions of an NFIT (SPA ranges whose type GUID is
    /// `NFIT.persistentMemoryGUID`), sorted by SPA range index. See the type's doc comment for the rule.
    public static func fromNFIT(_ nfit: NFIT) -> HostPersistence {
        var hints: [UInt32: [UInt64]] = [:]
        for f in nfit.flushHints { hints[f.deviceHandle, default: []].append(contentsOf: f.addresses) }
        let caps = nfit.platformCapabilities
        let wpqPersistent = (caps?.cacheFlushOnPowerLoss ?? false) || (caps?.memoryControllerFlushOnPowerLoss ?? false)
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
                                  flushTargets: targets, needsWPQFlush: !targets.isEmpty && !wpqPersistent))
        }
        regions.sort { $0.id < $1.id }
        return HostPersistence(regions: regions, source: "nfit")
    }

    // MARK: sysfs

    /// The libnvdimm regions under `root` (normally `/sys/bus/nd/devices`): each directory (or symlink
    /// to one) named `region<digits>`, read as in the kernel's drivers/nvdimm/region_devs.c:
    /// `resource` (hex start), `size` (decimal), `deep_flush` ("0"/"1", may be absent),
    /// `persistence_domain` (may be absent or empty), `mappings` (count) and `mappingK`
    /// ("nmemX,offset,length,position"); the controller of each mapping comes from
    /// `root/nmemX/nfit/handle` (an NFIT device handle; a DIMM without one contributes no
    /// controller). Regions are sorted by id. See the type's doc comment for the rule.
    ///
    /// Throws `.notFound` when `root` is not a readable directory, and `.invalidArgument` naming the
    /// file and its content when a region's `resource`, `size`, `mappings`, `mappingK` or a DIMM's
    /// `handle` is missing (where required) or malformed.
    public static func fromSysfs(root: String = "/sys/bus/nd/devices") throws(NPTError) -> HostPersistence {
        guard let names = listDirectory(root) else {
            throw NPTError(.notFound, "sysfs: cannot open directory \(root) (errno \(errno))")
        }
        var regions: [Region] = []
        for name in names {
            guard name.hasPrefix("region") else { continue }
            let digits = name.dropFirst("region".count)
            guard !digits.isEmpty, digits.allSatisfy({ $0 >= "0" && $0 <= "9" }), let id = UInt32(digits) else { continue }
            let dir = root + "/" + name
            guard isDirectory(dir) else { continue }
            regions.append(try readRegion(id: id, dir: dir, root: root))
        }
        regions.sort { $0.id < $1.id }
        return HostPersistence(regions: regions, source: "sysfs")
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
        let controllers = Set(handles.map { NFIT.DeviceHandle($0).controllerKey }).sorted()
        let deepFlushFile = dir + "/deep_flush"
        let deepFlush = readSmallFile(deepFlushFile)
        let hasFlush = deepFlush.map { trimmed($0) == "1" } ?? false
        let domain = readSmallFile(dir + "/persistence_domain") ?? ""
        let wpqPersistent = domain.contains("cpu_cache") || domain.contains("memory_controller")
        return Region(id: id, base: base, size: size, controllers: controllers,
                      flushTargets: hasFlush ? controllers.map { FlushTarget(controller: $0, address: 0) } : [],
                      needsWPQFlush: hasFlush && !wpqPersistent,
                      deepFlushPath: deepFlush == nil ? nil : deepFlushFile)
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
