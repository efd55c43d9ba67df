import ArgumentParser
import NPTCore
import NPTSimulator
#if canImport(Glibc)
import Glibc
#endif

// `nptkit-cli nfit`, `nptkit-cli host-pmem` and the demo's NVDIMM section. File I/O through Glibc
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
    (PersistenceScenario.nvdimmGPA, PersistenceScenario.nvdimmSize, 1, 0),
    (PersistenceScenario.nvdimmGPA + 0x40_0000, 2 << 20, 2, 0),
]

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
        let vm = try PersistenceScenario.makeVM(backend: backend)
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

        print("Guest NFIT of a VM with \(PersistenceScenario.ram >> 20) MiB of RAM and \(guestNVDIMMs.count) NVDIMM ranges")
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

// MARK: the demo section

extension Demo {
    struct PMemRow {
        var name: String
        var trapped: Bool
        var stats: FlushStatistics
        var survived: Int
        var records: Int
        var storedOnly: Bool
        var fencedOnly: Bool
        var report: CrashChecker.Report
        var lostRecords: Int { Set(report.losses.map(\.spa)).count }
    }

    /// One configuration: the scenario with a crash checker, then a power failure, then the records read back.
    func pmemRun(_ name: String, needsFlush: Bool, trap: FlushOptions.Trap, records: Int) throws -> PMemRow {
        typealias S = PersistenceScenario
        let backend = try SimulatorBackend(platform: .standard(needsWPQFlush: needsFlush))
        let vm = try S.makeVM(backend: backend)
        defer { try? vm.destroy() }
        try vm.addNVDIMM(gpa: GPA(S.nvdimmGPA), size: S.nvdimmSize, hostRegion: 1, regionOffset: 0)
        try vm.setFlushOptions(FlushOptions(trap: trap))
        let checker = CrashChecker(platform: backend.platform)
        let v = try S(cpus: 1, records: records, tail: true).setUp(vm)[0]
        let printed = try PersistenceScenario.runToHalt(v)
        let report = checker.stop()
        guard printed.filter({ $0.0 == S.portDurable }).count == records else {
            throw NPTError(.state, "the guest announced \(printed) instead of \(records) durable records")
        }
        let stats = vm.flushStatistics()
        try vm.powerFailure()
        var survived = 0
        for k in 0..<records where try readGuest64(vm, S.recordGPA(cpu: 0, k)) == S.recordValue(cpu: 0, k) { survived += 1 }
        let stored = try readGuest64(vm, S.recordGPA(cpu: 0, records)) == S.recordValue(cpu: 0, records)
        let fenced = try readGuest64(vm, S.recordGPA(cpu: 0, records + 1)) == S.recordValue(cpu: 0, records + 1)
        return PMemRow(name: name, trapped: vm.flushHintTrapped, stats: stats, survived: survived, records: records,
                       storedOnly: stored, fencedOnly: fenced, report: report)
    }

    func nvdimmSection() throws {
        let records = 4
        print("\n--- Virtualized NVDIMM WPQ flushing ---")
        print("A guest makes a record durable by the documented protocol: store, CLWB, SFENCE, then a write to the")
        print("virtual flush hint address (vFHA) its NFIT names. Where the host's write-pending queues are outside the")
        print("persistence domain, the vFHA is write-protected: the write exits and the core writes the physical flush")
        print("hint of each memory controller behind the VM's NVDIMM range before resuming the guest. On an ADR host")
        print("the vFHA is plain memory: no exit. One vCPU writes \(records) durable records, then one it only stores and")
        print("one it writes back and fences but does not flush. A crash checker treats every persistence event as a")
        print("possible power failure; then the power does fail, and the records are read back.\n")
        let rows = [
            try pmemRun("needs flushing", needsFlush: true, trap: .auto, records: records),
            try pmemRun("ADR", needsFlush: false, trap: .auto, records: records),
            try pmemRun("needs flushing, traps off", needsFlush: true, trap: .never, records: records),
        ]
        var t = Table(["host platform", "vFHA trapped", "flush exits", "guest flushes", "physical flushes",
                       "untrapped vFHA writes", "durable survived", "stored-only", "fenced-only",
                       "crash points", "losses found"])
        for r in rows {
            let s = r.stats
            t.add([r.name, r.trapped ? "yes" : "no", "\(s.exits)", "\(s.guestFlushes)", "\(s.physicalFlushes)", "\(s.untrappedWrites)",
                   "\(r.survived)/\(r.records)", r.storedOnly ? "survived" : "lost", r.fencedOnly ? "survived" : "lost",
                   "\(r.report.crashPoints)",
                   r.report.losses.isEmpty ? "0" : "\(r.report.losses.count) (\(r.lostRecords) of \(r.records) records)"])
        }
        print(t.render())
        print("Crash checker: \(rows[0].report.losses.count) losses with trapped flushes on the platform that needs WPQ flushing, \(rows[1].report.losses.count) on ADR, \(rows[2].report.losses.count) with traps disabled there")
        print("Each trapped guest flush costs one exit and drains both controllers region 1 is interleaved over; the")
        print("durable records survive where the protocol is honoured. Records never flushed are lost except that ADR")
        print("drains the WPQ, so the fenced one survives it. With traps disabled the same guest's durable records sit")
        print("in the WPQ at the power failure and are lost, and the checker finds every one of them.")
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
