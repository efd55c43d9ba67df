import ArgumentParser
import NPTCore
import NPTScenarios
import NPTSimulator
#if canImport(Glibc)
import Glibc
import NPTHost
#endif

// `nptkit-cli nfit` and `nptkit-cli host-pmem`. File I/O through Glibc
// (no Foundation, as in the rest of the CLI).

enum PlatformArgument: String, ExpressibleByArgument, CaseIterable {
    case needsFlush = "needs-flush", adr
    var needsWPQFlush: Bool { self == .needsFlush }
    func description(flushLatencyNanos: UInt64 = 0) -> PlatformDescription {
        .standard(needsWPQFlush: needsWPQFlush, flushLatencyNanos: flushLatencyNanos)
    }
    var text: String { needsWPQFlush ? "needs WPQ flushing (WPQs outside the persistence domain)" : "ADR (WPQs drained at power loss)" }
}

/// The guest NVDIMM ranges of `nfit` (deterministic): 2 MiB from host region 1 (interleaved over
/// two controllers) at the scenario's address, 2 MiB from host region 2 (one controller) above it.
let guestNVDIMMs: [(gpa: UInt64, size: UInt64, region: UInt32, offset: UInt64)] = [
    (NVDIMMSim.nvdimmGPA, NVDIMMSim.nvdimmSize, 1, 0),
    (NVDIMMSim.nvdimmGPA + 0x40_0000, 2 << 20, 2, 0),
]

/// A VM of the NVDIMM scenario's size on a simulator backend of its own (its own platform).
func simVM(_ backend: SimulatorBackend, budget: UInt64 = 0) throws(NPTError) -> VirtualMachine {
    let reg = BackendRegistry()
    try reg.register(backend, makeDefault: true)
    return try VirtualMachine(config: VMConfig(ramSize: NVDIMMSim.ram, maxStepsPerRun: budget), registry: reg)
}

struct Nfit: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nfit",
        abstract: "Write the guest NFIT (and the SSDT with its NVDIMM devices) of a simulator VM with two NVDIMM ranges.",
        discussion: """
            The NFIT has per range an SPA range, a memory-device map, a control region and a flush hint \
            structure naming the vFHA, and the platform capabilities of the host (see GuestNVDIMM for the \
            rules). The SSDT declares the NVDIMM root device (ACPI0012) with one child per DIMM handle. A \
            VMM passes both to the guest, e.g. QEMU: -acpitable file=NFIT -acpitable file=SSDT.
            """)
    @Option(help: "File to write the NFIT (binary ACPI table, .aml) to.")
    var out: String
    @Option(help: "File to write the SSDT (binary ACPI table with the ACPI0012 NVDIMM root device) to.")
    var ssdt: String?
    @Option(help: "Simulated host platform: needs-flush (WPQs outside the persistence domain) or adr.")
    var platform: PlatformArgument = .needsFlush

    func run() throws {
        let backend = try SimulatorBackend(platform: platform.description())
        let vm = try simVM(backend)
        defer { try? vm.destroy() }
        for r in guestNVDIMMs {
            try vm.addNVDIMM(gpa: GPA(r.gpa), size: r.size, hostRegion: r.region, regionOffset: r.offset)
        }
        let guest = try vm.guestNVDIMM()
        let bytes = guest.nfit().encode()
        let table = try NFIT.parse(bytes)
        if let err = writeFile(out, bytes) { fail("nfit: cannot write \(out): \(err)") }
        let ssdtBytes = try guest.ssdt()
        if let ssdt, let err = writeFile(ssdt, ssdtBytes) { fail("nfit: cannot write \(ssdt): \(err)") }
        guard let vfha = vm.virtualFlushHint else { throw NPTError(.state, "no vFHA") }

        print("Guest NFIT of a VM with \(NVDIMMSim.ram >> 20) MiB of RAM and \(guestNVDIMMs.count) NVDIMM ranges")
        print("Host platform (simulator): \(platform.text)")
        print("vFHA: \(hex(vfha.raw))   trapped: \(vm.flushHintTrapped ? "yes (a guest write exits)" : "no (a guest write costs no exit)")")
        print("Physical flush hints behind it: \(vm.flushTargets.map(\.description).joined(separator: "; "))")
        var t = Table(["SPA range", "guest-physical base", "length", "virtual DIMM handle", "control region", "flush hint",
                       "namespace device", "backed by"])
        for (i, r) in table.spaRanges.enumerated() {
            let m = table.memoryMaps.first { $0.spaRangeIndex == r.index }
            let handle = m?.deviceHandle ?? 0
            let hints = table.flushHints.first { $0.deviceHandle == handle }?.addresses.map(hex).joined(separator: ",") ?? "-"
            let backing = i < vm.nvdimmRanges.count ? "host region \(vm.nvdimmRanges[i].hostRegion) +\(hex(vm.nvdimmRanges[i].regionOffset))" : ""
            t.add(["\(r.index)", hex(r.base), hex(r.length), hex(UInt64(handle)), "\(m?.controlRegionIndex ?? 0)", hints,
                   "\\_SB.\(GuestNVDIMM.rootName).\(GuestNVDIMM.childName(i))", backing])
        }
        print(t.render())
        let caps = table.platformCapabilities ?? NFIT.PlatformCapabilities()
        print("Platform capabilities: highest valid \(caps.highestValid), capabilities \(hex(UInt64(caps.capabilities))) (guest persistence domain: \(guest.domain))")
        let sum = bytes.reduce(UInt8(0), &+)
        print("Table: signature \"\(NFIT.signature)\", length \(bytes.count) bytes, checksum \(hex(UInt64(bytes[9]))) (bytes sum to \(sum == 0 ? "0: ok" : "\(sum): BAD"))")
        let rules = GuestNVDIMM.violations(nfit: table, table: bytes, ssdtHandles: guest.dimms.map(\.handle), flushHint: vfha.raw)
        print("Rules T1-T8 (GuestNVDIMM): \(rules.isEmpty ? "all hold" : rules.joined(separator: "; "))")
        print("Wrote \(out)")
        if let ssdt {
            print("SSDT: \\_SB.\(GuestNVDIMM.rootName) (_HID \"\(GuestNVDIMM.rootHID)\") with \(guest.dimms.count) children, _ADR = \(guest.dimms.map { hex(UInt64($0.handle)) }.joined(separator: ", ")); \(ssdtBytes.count) bytes, checksum \(hex(UInt64(ssdtBytes[9])))")
            print("Wrote \(ssdt)")
        }
    }
}

struct HostPMem: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "host-pmem",
        abstract: "Discover the host's persistent-memory regions and whether they need WPQ flushing.",
        discussion: "Sources: an NFIT binary (--nfit), a libnvdimm sysfs tree (--sysfs, e.g. /sys/bus/nd/devices), or by default the simulator's platform (--platform).")
    @Option(help: "Read an NFIT binary (e.g. /sys/firmware/acpi/tables/NFIT).")
    var nfit: String?
    @Option(help: "Read a libnvdimm sysfs tree rooted here (the live host: /sys/bus/nd/devices).")
    var sysfs: String?
    @Option(help: "Simulated platform, when neither --nfit nor --sysfs is given: needs-flush or adr.")
    var platform: PlatformArgument = .needsFlush

    func validate() throws {
        if nfit != nil && sysfs != nil { throw ValidationError("give --nfit or --sysfs, not both") }
    }

    func run() throws {
        let host: HostPersistence
        let from: String
        if let path = nfit {
            let bytes: [UInt8]
            switch readFile(path) {
            case .success(let b): bytes = b
            case .failure(let e): fail("host-pmem: cannot read \(path): \(e.message)")
            }
            do throws(NPTError) { host = try HostPersistence.checkedFromNFIT(try NFIT.parse(bytes)) } catch {
                fail("host-pmem: \(path) is not a valid NFIT: \(error.message)")
            }
            from = "NFIT \(path) (\(bytes.count) bytes)"
        } else if let root = sysfs {
            do throws(NPTError) { host = try HostPersistence.fromSysfs(root: root) } catch {
                fail("host-pmem: \(error.message)")
            }
            from = "sysfs \(root)"
        } else {
            host = platform.description().persistence
            from = "simulator platform: \(platform.text)"
        }
        print("Host persistent memory from \(from)")
        var t = Table(["region", "base", "size", "controllers", "flush targets (controller: hint)", "persistence domain",
                       "needs WPQ flushing"])
        for r in host.regions {
            let targets = r.flushTargets.map { "\(hex(UInt64($0.controller))): \($0.address == 0 ? "deep_flush" : hex($0.address))" }
            t.add(["\(r.id)", hex(r.base), hex(r.size), r.controllers.map { hex(UInt64($0)) }.joined(separator: ","),
                   targets.isEmpty ? "-" : targets.joined(separator: ", "), "\(r.domain)", r.needsWPQFlush ? "yes" : "no"])
        }
        print(t.render())
        print("\(host.regions.count) region\(host.regions.count == 1 ? "" : "s"); WPQ flushing needed: \(host.needsWPQFlush ? "yes (guest flushes must trap)" : "no (guest flushes cost no exit)")")
    }
}

// MARK: helpers


func readGuest64(_ vm: VirtualMachine, _ gpa: UInt64) throws(NPTError) -> UInt64 {
    var v: UInt64 = 0
    try withUnsafeMutableBytes(of: &v) { b throws(NPTError) in try vm.readMemory(GPA(gpa), b) }
    return v
}

/// Prints `nptkit-cli: message` on standard error and exits with status 1.
func fail(_ message: String) -> Never {
    let line = Array(("nptkit-cli " + message + "\n").utf8)
    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    exit(1)
}

/// Online host CPUs (the benchmark prints it beside threaded figures).
func hostCPUs() -> Int { Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) }

func errnoText() -> String { String(cString: strerror(errno)) }

/// Writes `bytes` to `path` (created or truncated); returns an error text on failure.
func writeFile(_ path: String, _ bytes: [UInt8]) -> String? {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    if fd < 0 { return errnoText() }
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
        if n < 0 {
            if errno == EINTR { continue }
            let e = errnoText()
            close(fd)
            return e
        }
        done += n
    }
    if close(fd) != 0 { return errnoText() }
    return nil
}

/// The contents of a file (at most 16 MiB).
func readFile(_ path: String) -> Result<[UInt8], NPTError> {
    let fd = open(path, O_RDONLY)
    if fd < 0 { return .failure(NPTError(.notFound, errnoText())) }
    defer { close(fd) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while out.count < 16 << 20 {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { if errno == EINTR { continue }; return .failure(NPTError(.invalidArgument, errnoText())) }
        if n == 0 { break }
        out.append(contentsOf: buf[0..<n])
    }
    return .success(out)
}
