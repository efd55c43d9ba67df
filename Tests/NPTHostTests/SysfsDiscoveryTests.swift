import Foundation
import NPTCore
import NPTHost
import Testing

private typealias Target = HostPersistence.FlushTarget

/// Tests/Fixtures (this file is Tests/NPTHostTests/SysfsDiscoveryTests.swift).
private let fixturesDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("Fixtures")

/// A scratch directory for sysfs trees built by a test.
private struct ScratchTree: ~Copyable {
    let root: URL
    init() throws {
        root = FileManager.default.temporaryDirectory
            .appendingPathComponent("hostpersistence-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(at: root) }
    func write(_ path: String, _ content: String) throws {
        let url = root.appendingPathComponent(path)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try content.write(to: url, atomically: false, encoding: .utf8)
    }
    func remove(_ path: String) throws { try FileManager.default.removeItem(at: root.appendingPathComponent(path)) }
    /// One region with one DIMM (handle 0x101).
    func writeValidRegion() throws {
        try write("region3/resource", "0x100000000\n")
        try write("region3/size", "4096\n")
        try write("region3/deep_flush", "1\n")
        try write("region3/persistence_domain", "\n")
        try write("region3/mappings", "1\n")
        try write("region3/mapping0", "nmem0,0,4096,0\n")
        try write("nmem0/nfit/handle", "0x101\n")
    }
}

private func sysfsError(_ root: String) -> NPTError? {
    do { _ = try HostPersistence.fromSysfs(root: root); return nil } catch { return error }
}

@Suite struct SysfsDiscoveryTests {
    @Test func fromSysfsNeedingFlush() throws {
        let root = fixturesDirectory.appendingPathComponent("sysfs/wpq/bus/nd/devices").path
        let hp = try HostPersistence.fromSysfs(root: root)
        #expect(hp.source == "sysfs")
        #expect(hp.needsWPQFlush)
        #expect(hp.regions == [
            .init(id: 0, base: 0x2_4000_0000, size: 4_294_967_296, controllers: [0x0000, 0x0100],
                  flushTargets: [Target(controller: 0, address: 0), Target(controller: 0x100, address: 0)],
                  needsWPQFlush: true, deepFlushPath: root + "/region0/deep_flush"),
            .init(id: 1, base: 0x3_4000_0000, size: 2_147_483_648, controllers: [0x1000],
                  flushTargets: [Target(controller: 0x1000, address: 0)],
                  needsWPQFlush: true, deepFlushPath: root + "/region1/deep_flush"),
            .init(id: 10, base: 0x3_C000_0000, size: 1_073_741_824, controllers: [], flushTargets: [],
                  needsWPQFlush: false, deepFlushPath: root + "/region10/deep_flush"),
        ])
    }

    /// Every persistence_domain case (Tests/Fixtures/sysfs/README.md, `domains`).
    @Test func fromSysfsEveryDomainCase() throws {
        let root = fixturesDirectory.appendingPathComponent("sysfs/domains").path
        let hp = try HostPersistence.fromSysfs(root: root)
        func region(_ n: UInt32, controllers: [UInt32], flushes: Bool, needs: Bool, deepFlush: Bool = true,
                    domain: HostPersistence.Domain) -> HostPersistence.Region {
            .init(id: n, base: 0x1_0000_0000 + UInt64(n) * 0x4000_0000, size: 1 << 30, controllers: controllers,
                  flushTargets: flushes ? controllers.map { Target(controller: $0, address: 0) } : [],
                  needsWPQFlush: needs, deepFlushPath: deepFlush ? root + "/region\(n)/deep_flush" : nil, domain: domain)
        }
        #expect(hp.regions == [
            region(0, controllers: [0], flushes: true, needs: true, domain: .media),              // no persistence_domain
            region(1, controllers: [0x100], flushes: true, needs: true, domain: .media),          // an empty one
            region(2, controllers: [0], flushes: true, needs: false, domain: .memoryController),
            region(3, controllers: [0], flushes: true, needs: false, domain: .cpuCache),
            region(4, controllers: [0], flushes: false, needs: false, domain: .media),            // deep_flush 0
            region(5, controllers: [0], flushes: false, needs: false, deepFlush: false, domain: .cpuCache),
            region(6, controllers: [0], flushes: true, needs: true, domain: .media),              // unknown word
            region(7, controllers: [0], flushes: true, needs: true, domain: .media),              // DIMM without handle
        ])
        #expect(HostPersistence.sysfsDomain(nil) == .media)
        #expect(HostPersistence.sysfsDomain("") == .media)
        #expect(HostPersistence.sysfsDomain("memory_controller\n") == .memoryController)
        #expect(HostPersistence.sysfsDomain(" cpu_cache\n") == .cpuCache)
        #expect(HostPersistence.sysfsDomain("cpu_cache memory_controller") == .media)
    }

    /// Which directory names are regions, and their ids: N of regionN, 0 included (the numbering
    /// rule the KVM plugin shares through the C ABI).
    @Test func fromSysfsNumbering() throws {
        let root = fixturesDirectory.appendingPathComponent("sysfs/numbering").path
        let hp = try HostPersistence.fromSysfs(root: root)
        #expect(hp.regions.map(\.id) == [0, 7, 9, 12, 4_294_967_295])
        #expect(hp.regions.map(\.base) == [0x1_0000_0000, 0x2_0000_0000, 0x9_0000_0000, 0x3_0000_0000, 0x4_0000_0000])
        #expect(hp.regions.allSatisfy { $0.size == 4096 && $0.flushTargets.isEmpty && !$0.needsWPQFlush })
        for (name, id) in [("region0", UInt32(0)), ("region7", 7), ("region12", 12), ("region4294967295", .max)] {
            #expect(HostPersistence.sysfsRegionNumber(name) == id, "\(name)")
        }
        for name in ["region01", "region00", "region", "region-1", "region+1", "region4294967296", "regionX", "region1a",
                     "Region1", "nmem0", "region 1", "region١"] {
            #expect(HostPersistence.sysfsRegionNumber(name) == nil, "\(name)")
        }
    }

    @Test func fromSysfsWithPersistenceDomains() throws {
        let root = fixturesDirectory.appendingPathComponent("sysfs/adr").path
        let hp = try HostPersistence.fromSysfs(root: root)
        #expect(!hp.needsWPQFlush)
        #expect(hp.regions == [
            .init(id: 0, base: 0x2_4000_0000, size: 4_294_967_296, controllers: [0x0000, 0x0100],
                  flushTargets: [Target(controller: 0, address: 0), Target(controller: 0x100, address: 0)],
                  needsWPQFlush: false, deepFlushPath: root + "/region0/deep_flush", domain: .memoryController),
            .init(id: 1, base: 0x3_4000_0000, size: 2_147_483_648, controllers: [0x1000], flushTargets: [],
                  needsWPQFlush: false, deepFlushPath: nil, domain: .cpuCache),
        ])
    }

    @Test func fromSysfsErrors() throws {
        let missing = fixturesDirectory.appendingPathComponent("sysfs/no-such-dir").path
        let e1 = sysfsError(missing)
        #expect(e1?.code == .notFound)
        #expect(e1?.message.contains(missing) == true)

        let broken = fixturesDirectory.appendingPathComponent("sysfs/broken").path
        let e2 = sysfsError(broken)
        #expect(e2?.code == .invalidArgument)
        #expect(e2?.message.contains(broken + "/region0/resource") == true)
        #expect(e2?.message.contains("\"0xZZZ\\n\"") == true, "\(e2?.message ?? "")")
    }

    @Test func fromSysfsMalformedFiles() throws {
        let cases: [(file: String, content: String?, fragment: String)] = [
            ("region3/size", nil, "region3/size is missing"),
            ("region3/resource", nil, "region3/resource is missing"),
            ("region3/size", "0x1000\n", "region3/size holds \"0x1000\\n\""),
            ("region3/size", "99999999999999999999999\n", "not a decimal size"),
            ("region3/resource", "\n", "region3/resource holds \"\\n\""),
            ("region3/resource", "0x1ffffffffffffffff\n", "not a hexadecimal address"),
            ("region3/mappings", "two\n", "region3/mappings holds \"two\\n\""),
            ("region3/mapping0", nil, "region3/mapping0 is missing"),
            ("region3/mapping0", "dimm0,0,4096,0\n", "region3/mapping0 holds"),
            ("region3/mapping0", "nmem0\n", "region3/mapping0 holds"),
            ("region3/mapping0", "nmem0/../x,0,4096,0\n", "region3/mapping0 holds"),
            ("nmem0/nfit/handle", "0xq\n", "nmem0/nfit/handle holds \"0xq\\n\""),
            ("nmem0/nfit/handle", "0x100000000\n", "nmem0/nfit/handle"),
        ]
        for c in cases {
            let tree = try ScratchTree()
            try tree.writeValidRegion()
            if let content = c.content { try tree.write(c.file, content) } else { try tree.remove(c.file) }
            let e = sysfsError(tree.root.path)
            #expect(e?.code == .invalidArgument, "\(c.file)")
            #expect(e?.message.contains(c.fragment) == true, "\(e?.message ?? "no error") lacks \(c.fragment)")
        }
    }

    @Test func fromSysfsOptionalFiles() throws {
        let tree = try ScratchTree()
        try tree.writeValidRegion()
        var hp = try HostPersistence.fromSysfs(root: tree.root.path)
        #expect(hp.regions == [.init(id: 3, base: 0x1_0000_0000, size: 4096, controllers: [0x100],
                                     flushTargets: [Target(controller: 0x100, address: 0)], needsWPQFlush: true,
                                     deepFlushPath: tree.root.path + "/region3/deep_flush")])
        // A DIMM without an NFIT handle contributes no controller; a region with flush hints then has
        // one controller, key 0, for its deep_flush; without flush hints none. No mappings file means
        // no mappings.
        try tree.remove("nmem0/nfit/handle")
        hp = try HostPersistence.fromSysfs(root: tree.root.path)
        #expect(hp.regions[0].controllers == [0])
        #expect(hp.regions[0].flushTargets == [Target(controller: 0, address: 0)])
        #expect(hp.regions[0].needsWPQFlush)
        try tree.write("region3/deep_flush", "0\n")
        hp = try HostPersistence.fromSysfs(root: tree.root.path)
        #expect(hp.regions[0].controllers == [] && hp.regions[0].flushTargets == [] && !hp.regions[0].needsWPQFlush)
        try tree.remove("region3/mappings")
        try tree.remove("region3/deep_flush")
        try tree.write("region3/resource", "0\n")   // the kernel prints %#llx: "0" for zero
        try tree.write("region3/persistence_domain", "cpu_cache\n")
        try tree.write("region12", "not a directory\n")
        try tree.write("regions/resource", "0x0\n")
        hp = try HostPersistence.fromSysfs(root: tree.root.path)
        #expect(hp.regions == [.init(id: 3, base: 0, size: 4096, domain: .cpuCache)])
        #expect(try HostPersistence.fromSysfs(root: tree.root.path + "/nmem0").regions == [])
    }
}
