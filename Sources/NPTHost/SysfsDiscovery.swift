#if canImport(Glibc)
import Glibc
#endif
import NPTCore

// The host's side of the one host discovery (`HostPersistence`, in NPTCore, holds the rule and the
// NFIT reading; the core stays free of file-system code): the libnvdimm sysfs tree.
extension HostPersistence {
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
    package static func fromSysfs(root: String = defaultSysfsRoot) throws(NPTError) -> HostPersistence {
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
    package static let defaultSysfsRoot = "/sys/bus/nd/devices"

    /// N for a directory name `region<N>` as the kernel names regions (see `fromSysfs`), else nil.
    package static func sysfsRegionNumber(_ name: String) -> UInt32? {
        guard name.hasPrefix("region") else { return nil }
        let digits = name.utf8.dropFirst("region".utf8.count)
        guard let first = digits.first, digits.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) else {
            return nil
        }
        if first == UInt8(ascii: "0") && digits.count > 1 { return nil }
        return UInt32(Substring(name.dropFirst("region".count)))
    }

    /// The persistence domain a region's `persistence_domain` file names (nil: no such file).
    package static func sysfsDomain(_ content: String?) -> Domain {
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
