import Foundation
import NPTCore
import Testing

/// A reader for the AML subset GuestNVDIMM writes (Scope, Device, Name, integer and string
/// constants), written from the AML grammar (ACPI 6.x §20.2) to check the encoder without iasl.
private struct AMLReader {
    enum Value: Equatable { case integer(UInt64), string(String) }
    struct Device: Equatable { var path: String; var names: [String: Value] }
    let b: [UInt8]
    var devices: [Device] = []
    var error: String?

    init(table: [UInt8]) {
        b = table
        read(36, b.count, scope: "")
    }

    func pkgLength(_ o: Int) -> (length: Int, size: Int) {
        let lead = Int(b[o]), extra = lead >> 6
        if extra == 0 { return (lead & 0x3F, 1) }
        var v = lead & 0xF
        for i in 0..<extra { v |= Int(b[o + 1 + i]) << (4 + 8 * i) }
        return (v, 1 + extra)
    }

    func seg(_ o: Int) -> String { String(decoding: b[o..<(o + 4)], as: UTF8.self) }

    func value(_ o: Int) -> (Value, Int)? {
        switch b[o] {
        case 0x00: return (.integer(0), 1)
        case 0x01: return (.integer(1), 1)
        case 0xFF: return (.integer(.max), 1)
        case 0x0A, 0x0B, 0x0C, 0x0E:
            let n = [0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8][Int(b[o])]!
            return (.integer((0..<n).reduce(0) { $0 | UInt64(b[o + 1 + $1]) << (8 * UInt64($1)) }), 1 + n)
        case 0x0D:
            guard let end = b[(o + 1)...].firstIndex(of: 0) else { return nil }
            return (.string(String(decoding: b[(o + 1)..<end], as: UTF8.self)), end - o + 1)
        default: return nil
        }
    }

    mutating func read(_ start: Int, _ end: Int, scope: String) {
        var o = start
        var names: [String: Value] = [:]
        while o < end && error == nil {
            if b[o] == 0x10 {                                     // Scope
                let (len, size) = pkgLength(o + 1)
                guard b[o + 1 + size] == UInt8(ascii: "\\") else { error = "scope without root name at \(o)"; return }
                let name = "\\" + seg(o + 2 + size)
                read(o + 6 + size, o + 1 + len, scope: name)
                o += 1 + len
            } else if b[o] == 0x5B && b[o + 1] == 0x82 {           // Device
                let (len, size) = pkgLength(o + 2)
                let name = scope + "." + seg(o + 2 + size)
                read(o + 6 + size, o + 2 + len, scope: name)
                o += 2 + len
            } else if b[o] == 0x08 {                              // Name
                guard let (v, n) = value(o + 5) else { error = "unknown data object at \(o + 5)"; return }
                names[seg(o + 1)] = v
                o += 5 + n
            } else {
                error = "unknown opcode \(hex(UInt64(b[o]))) at \(o)"; return
            }
        }
        if o != end && error == nil { error = "package ends at \(o), expected \(end)" }
        if !names.isEmpty { devices.append(Device(path: scope, names: names)) }
    }
}

/// Runs iasl (if installed) in `dir`; returns its output (nil: no iasl).
private func iasl(_ args: [String], in dir: URL) throws -> String? {
    let path = "/usr/bin/iasl"
    guard FileManager.default.isExecutableFile(atPath: path) else { return nil }
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = args
    p.currentDirectoryURL = dir
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    try p.run()
    let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    p.waitUntilExit()
    return out
}

private func layout(_ n: Int, domain: HostPersistence.Domain = .media) -> GuestNVDIMM {
    GuestNVDIMM(dimms: (0..<n).map { GuestNVDIMM.DIMM(handle: GuestNVDIMM.handle(ofDIMM: $0),
                                                      base: 0x1_0000_0000 + UInt64($0) * 0x40_0000, size: 2 << 20) },
                flushHint: 0x1_0020_0000 + UInt64(n) * 0x40_0000, domain: domain)
}

@Suite struct GuestNVDIMMTests {
    @Test func amlEncodings() throws {
        #expect(try AML.pkgLength(contentLength: 0) == [1])
        #expect(try AML.pkgLength(contentLength: 62) == [63])
        // 63 content bytes: 65 with a two-byte PkgLength (0x41 = one more byte, low nibble 1).
        #expect(try AML.pkgLength(contentLength: 63) == [0x41, 0x04])
        #expect(try AML.pkgLength(contentLength: 4093) == [0x4F, 0xFF])          // 4095
        #expect(try AML.pkgLength(contentLength: 4094) == [0x81, 0x00, 0x01])    // 4097 needs three
        #expect(try AML.pkgLength(contentLength: (1 << 20) - 4) == [0x80 | 0xF, 0xFF, 0xFF])
        #expect(try AML.pkgLength(contentLength: (1 << 20) - 3) == [0xC1, 0x00, 0x00, 0x01])
        #expect(throws: NPTError.self) { try AML.pkgLength(contentLength: 1 << 28) }
        #expect(AML.integer(0) == [0x00] && AML.integer(1) == [0x01] && AML.integer(.max) == [0xFF])
        #expect(AML.integer(2) == [0x0A, 2] && AML.integer(0xFF) == [0x0A, 0xFF])
        #expect(AML.integer(0x100) == [0x0B, 0, 1] && AML.integer(0x1_0000) == [0x0C, 0, 0, 1, 0])
        #expect(AML.integer(0x1_0000_0000) == [0x0E, 0, 0, 0, 0, 1, 0, 0, 0])
        #expect(try AML.nameSeg("_SB") == Array("_SB_".utf8))
        #expect(try AML.nameSeg("NV0F") == Array("NV0F".utf8))
        for bad in ["", "ABCDE", "0ABC", "nv00", "A-B"] {
            #expect(throws: NPTError.self, "\(bad)") { try AML.nameSeg(bad) }
        }
        #expect(try AML.string("ACPI0012") == [0x0D] + Array("ACPI0012".utf8) + [0])
        #expect(throws: NPTError.self) { try AML.string("é") }
        let t = AML.definitionBlock(signature: "SSDT", oemTableID: "X", body: [1, 2, 3])
        #expect(t.count == 39 && Array(t[0..<4]) == Array("SSDT".utf8) && t[4] == 39 && t[8] == 2)
        #expect(Array(t[16..<24]) == Array("X       ".utf8) && t.reduce(UInt8(0), &+) == 0)
    }

    @Test(arguments: [1, 2, 16, 64, 256])
    func ssdtDeclaresTheRootDeviceAndOneChildPerHandle(count: Int) throws {
        let g = layout(count)
        let ssdt = try g.ssdt()
        #expect(ssdt.reduce(UInt8(0), &+) == 0)
        #expect(Array(ssdt[0..<4]) == Array("SSDT".utf8) && ssdt[8] == 2)
        let r = AMLReader(table: ssdt)
        #expect(r.error == nil, "\(r.error ?? "")")
        let root = r.devices.first { $0.path == "\\_SB_.NVDR" }
        #expect(root?.names == ["_HID": .string("ACPI0012")])
        let children = r.devices.filter { $0.path.hasPrefix("\\_SB_.NVDR.") }
        #expect(children.map(\.path) == (0..<count).map { "\\_SB_.NVDR." + GuestNVDIMM.childName($0) })
        #expect(children.map { $0.names["_ADR"] } == g.dimms.map { .integer(UInt64($0.handle)) })
        // ACPICA decodes it without a complaint, and compiling what it decoded gives the same AML.
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("guestnvdimm-\(getpid())-\(count)-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        try Data(ssdt).write(to: dir.appendingPathComponent("ssdt.aml"))
        guard let out = try iasl(["-d", "ssdt.aml"], in: dir) else { return }
        #expect(!out.contains("Warning") && !out.contains("Error") && !out.contains("****"), "\(out)")
        guard let out2 = try iasl(["-p", "rebuilt", "ssdt.dsl"], in: dir) else { return }
        #expect(out2.contains("0 Errors, 0 Warnings"), "\(out2)")
        let rebuilt = [UInt8](try Data(contentsOf: dir.appendingPathComponent("rebuilt.aml")))
        #expect(Array(rebuilt.dropFirst(36)) == Array(ssdt.dropFirst(36)))
    }

    @Test(arguments: [HostPersistence.Domain.media, .memoryController, .cpuCache])
    func nfitObeysEveryRule(domain: HostPersistence.Domain) throws {
        for n in [1, 2, 64] {
            let g = layout(n, domain: domain)
            let t = g.nfit()
            let bytes = t.encode()
            #expect(GuestNVDIMM.violations(nfit: t, table: bytes, ssdtHandles: g.dimms.map(\.handle), flushHint: g.flushHint) == [])
            #expect(try NFIT.parse(bytes) == t)
            #expect(t.controlRegions.count == n && t.memoryMaps.map(\.controlRegionIndex) == t.controlRegions.map(\.index))
            let caps = try #require(t.platformCapabilities)
            #expect(caps.highestValid == 1)
            #expect(caps.memoryControllerFlushOnPowerLoss == domain.holdsWPQ)
            #expect(caps.cacheFlushOnPowerLoss == (domain == .cpuCache))
            #expect(HostPersistence.domain(of: caps) == domain)
        }
        // The table tells an ADR host from one that needs flushing (they were byte-identical).
        #expect(layout(2, domain: .media).nfit().encode() != layout(2, domain: .memoryController).nfit().encode())
    }

    /// Each rule, broken on purpose, is reported by its name: the check can fail.
    @Test func everyRuleCatchesItsBreakage() throws {
        let g = layout(2)
        let good = g.nfit()
        func broken(_ change: (inout NFIT) -> Void, ssdt: [UInt32]? = nil, fixChecksum: Bool = true,
                    bytes: ((inout [UInt8]) -> Void)? = nil) -> [String] {
            var t = good
            change(&t)
            var b = t.encode()
            if let bytes {
                bytes(&b)
                if fixChecksum {
                    b[9] = 0
                    b[9] = 0 &- b.reduce(UInt8(0), &+)
                }
            }
            return GuestNVDIMM.violations(nfit: t, table: b, ssdtHandles: ssdt ?? g.dimms.map(\.handle), flushHint: g.flushHint)
        }
        func expectRule(_ v: [String], _ rule: String, sourceLocation: SourceLocation = #_sourceLocation) {
            #expect(v.contains { $0.hasPrefix(rule + ":") }, "\(v)", sourceLocation: sourceLocation)
        }
        #expect(broken { _ in } == [])
        expectRule(broken({ _ in }, bytes: { $0[8] = 2 }), "T1")
        expectRule(broken({ _ in }, fixChecksum: false, bytes: { $0[20] &+= 1 }), "T1")
        expectRule(broken({ _ in }, bytes: { $0 += [0, 0, 0, 0] }), "T1")
        // A flush hint structure that says 16 bytes (the first boot control).
        expectRule(broken({ _ in }, bytes: { b in
            let o = 40 + 56 * 2 + 48 * 2 + 80 * 2
            #expect(b[o] == 6)
            b[o + 2] = 16
        }), "T2")
        expectRule(broken { $0.spaRanges[1].index = 0 }, "T3")
        expectRule(broken { $0.spaRanges[0].typeGUID = NFIT.controlRegionGUID }, "T3")
        expectRule(broken { $0.spaRanges[1].base = $0.spaRanges[0].base + 0x1000 }, "T3")
        expectRule(broken { $0.spaRanges[0].memoryAttributes = 0x8 }, "T3")
        // No control regions, maps naming index 0: the table Linux oopsed on.
        expectRule(broken { t in t.controlRegions = []; for i in t.memoryMaps.indices { t.memoryMaps[i].controlRegionIndex = 0 } }, "T4")
        expectRule(broken { $0.memoryMaps[0].controlRegionIndex = 9 }, "T4")
        expectRule(broken { $0.memoryMaps[0].spaRangeIndex = 7 }, "T4")
        expectRule(broken { $0.memoryMaps[0].interleaveWays = 2 }, "T4")
        expectRule(broken { $0.controlRegions[1].serialNumber = $0.controlRegions[0].serialNumber }, "T5")
        expectRule(broken { $0.controlRegions[0].windows = 1 }, "T5")
        expectRule(broken { $0.controlRegions.removeLast(); $0.memoryMaps[1].controlRegionIndex = 1 }, "T5")
        expectRule(broken { $0.flushHints[0].addresses = [] }, "T6")
        expectRule(broken { $0.flushHints[1].addresses = [0xDEAD_0000] }, "T6")
        expectRule(broken { $0.flushHints.removeLast() }, "T6")
        expectRule(broken { $0.flushHints[0].addresses = [$0.spaRanges[1].base + 0x40] }, "T6")
        expectRule(broken { $0.platformCapabilities = nil }, "T7")
        expectRule(broken { $0.platformCapabilities = .init(highestValid: 1, capabilities: 1) }, "T7")
        expectRule(broken { $0.platformCapabilities = .init(highestValid: 0, capabilities: 0) }, "T7")
        expectRule(broken({ $0.otherStructures = [.init(type: 7, bytes: [1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0])] }), "T7")
        // The second boot control: a memory-device map's handle no namespace device has.
        expectRule(broken({ _ in }, ssdt: [g.dimms[0].handle]), "T8")
        expectRule(broken({ t in t.memoryMaps[0].deviceHandle = 0xF0F; t.flushHints[0].deviceHandle = 0xF0F }), "T8")
        expectRule(broken({ _ in }, ssdt: g.dimms.map(\.handle) + [0x77]), "T8")
    }

    @Test func guestDomainFollowsTheBackingRegions() {
        typealias R = HostPersistence.Region
        let t = [HostPersistence.FlushTarget(controller: 0, address: 0x1000)]
        let flush = R(id: 1, base: 0, size: 1 << 20, flushTargets: t, needsWPQFlush: true, domain: .media)
        let adr = R(id: 2, base: 0, size: 1 << 20, flushTargets: t, needsWPQFlush: false, domain: .memoryController)
        let eadr = R(id: 3, base: 0, size: 1 << 20, flushTargets: t, needsWPQFlush: false, domain: .cpuCache)
        let noHints = R(id: 4, base: 0, size: 1 << 20, domain: .media)
        #expect(GuestNVDIMM.guestDomain(backedBy: [flush]) == .media)
        #expect(GuestNVDIMM.guestDomain(backedBy: [adr, flush]) == .media)
        #expect(GuestNVDIMM.guestDomain(backedBy: [adr]) == .memoryController)
        #expect(GuestNVDIMM.guestDomain(backedBy: [eadr]) == .cpuCache)
        #expect(GuestNVDIMM.guestDomain(backedBy: [eadr, adr]) == .memoryController)
        #expect(GuestNVDIMM.guestDomain(backedBy: [noHints]) == .memoryController)
        #expect(GuestNVDIMM.guestDomain(backedBy: []) == .media)
    }

    @Test func handlesAndChildNames() {
        #expect((0..<64).map(GuestNVDIMM.handle(ofDIMM:)).count == Set((0..<64).map(GuestNVDIMM.handle(ofDIMM:))).count)
        #expect(GuestNVDIMM.handle(ofDIMM: 17) == 0x11 && NFIT.DeviceHandle(GuestNVDIMM.handle(ofDIMM: 63)).controller == 0)
        #expect(GuestNVDIMM.childName(0) == "NV00" && GuestNVDIMM.childName(0x3F) == "NV3F" && GuestNVDIMM.childName(255) == "NVFF")
        #expect(throws: NPTError.self) { try layout(257).ssdt() }
    }
}
