import Foundation
import NPTCore
import Testing
import NPTScenarios

/// Tests/Fixtures, located from this file.
let fixturesDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("Fixtures")

func fixtureBytes(_ relativePath: String) throws -> [UInt8] {
    [UInt8](try Data(contentsOf: fixturesDirectory.appendingPathComponent(relativePath)))
}

/// The error `NFIT.parse` throws for `bytes`, or nil when it parses.
func nfitParseError(_ bytes: [UInt8]) -> NPTError? {
    do { _ = try NFIT.parse(bytes); return nil } catch { return error }
}

/// Recomputes the checksum byte so that the table (per its length field) sums to 0.
func fixChecksum(_ bytes: inout [UInt8]) {
    let length = Int(UInt32(bytes[4]) | UInt32(bytes[5]) << 8 | UInt32(bytes[6]) << 16 | UInt32(bytes[7]) << 24)
    bytes[9] = 0
    var sum: UInt8 = 0
    for b in bytes.prefix(length) { sum &+= b }
    bytes[9] = 0 &- sum
}

func setLE(_ bytes: inout [UInt8], _ offset: Int, _ value: UInt64, width: Int) {
    for i in 0..<width { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
}

/// The NFIT of Tests/Fixtures/nfit/nfit.asl, as decoded by hand from the iasl source.
func expectedWPQFixture(highestValid: UInt8 = 0, oemTableID: String = "NPTKWPQ ") -> NFIT {
    let pm = NFIT.persistentMemoryGUID
    return NFIT(
        header: .init(revision: 1, oemID: Array("NPTKIT".utf8), oemTableID: Array(oemTableID.utf8), oemRevision: 2,
                      creatorID: Array("INTL".utf8), creatorRevision: 0x2020_0925),
        spaRanges: [
            .init(index: 1, flags: 2, proximityDomain: 0, typeGUID: pm, base: 0x2_4000_0000, length: 0x1_0000_0000,
                  memoryAttributes: 0x8008),
            .init(index: 2, flags: 2, proximityDomain: 1, typeGUID: pm, base: 0x3_4000_0000, length: 0x8000_0000,
                  memoryAttributes: 0x8008),
            .init(index: 3, flags: 0, proximityDomain: 0, typeGUID: NFIT.controlRegionGUID, base: 0xFE00_0000,
                  length: 0x1_0000, memoryAttributes: 1),
        ],
        memoryMaps: [
            .init(deviceHandle: 0x0001, physicalID: 1, spaRangeIndex: 1, regionSize: 0x4000_0000, regionOffset: 0,
                  interleaveIndex: 1, interleaveWays: 4),
            .init(deviceHandle: 0x0011, physicalID: 2, spaRangeIndex: 1, regionSize: 0x4000_0000, regionOffset: 0x1000,
                  interleaveIndex: 1, interleaveWays: 4),
            .init(deviceHandle: 0x0101, physicalID: 3, spaRangeIndex: 1, regionSize: 0x4000_0000, regionOffset: 0x2000,
                  interleaveIndex: 1, interleaveWays: 4),
            .init(deviceHandle: 0x0111, physicalID: 4, spaRangeIndex: 1, regionSize: 0x4000_0000, regionOffset: 0x3000,
                  interleaveIndex: 1, interleaveWays: 4, stateFlags: 0x20),
            .init(deviceHandle: 0x1001, physicalID: 5, spaRangeIndex: 2, regionSize: 0x8000_0000, regionOffset: 0,
                  interleaveIndex: 0, interleaveWays: 1),
        ],
        flushHints: [
            .init(deviceHandle: 0x0001, addresses: [0xC000_0000, 0xC000_0040]),
            .init(deviceHandle: 0x0011, addresses: [0xC000_0000, 0xC000_0040]),
            .init(deviceHandle: 0x0101, addresses: [0xC001_0000, 0xC001_0040]),
            .init(deviceHandle: 0x0111, addresses: [0xC001_0000, 0xC001_0040]),
            .init(deviceHandle: 0x1001, addresses: [0x1_C000_0000]),
        ],
        platformCapabilities: .init(highestValid: highestValid, capabilities: 2),
        otherStructures: [.init(type: 2, bytes: [1, 0, 0, 0, 1, 0, 0, 0, 0x00, 0x10, 0, 0, 0, 0, 0, 0])])
}

/// Offsets of the structures in nfit.aml (3 SPA, 5 maps, 1 interleave, 5 FHA, platform caps).
let fixtureStructureOffsets: [Int] = {
    var o = [40]
    for len in [56, 56, 56, 48, 48, 48, 48, 48, 20, 32, 32, 32, 32, 24, 16] { o.append(o.last! + len) }
    return o
}()

func randomNFIT(_ rng: inout SplitMix64) -> NFIT {
    func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) } }
    func u16() -> UInt16 { UInt16(truncatingIfNeeded: rng.next()) }
    func u32() -> UInt32 { UInt32(truncatingIfNeeded: rng.next()) }
    var n = NFIT(header: .init(revision: UInt8(truncatingIfNeeded: rng.next()), oemID: bytes(6), oemTableID: bytes(8),
                               oemRevision: u32(), creatorID: bytes(4), creatorRevision: u32()))
    for _ in 0..<(rng.next() % 4) {
        n.spaRanges.append(.init(index: u16(), flags: u16(), proximityDomain: u32(),
                                 typeGUID: rng.next() % 2 == 0 ? NFIT.persistentMemoryGUID : bytes(16),
                                 base: rng.next(), length: rng.next(), memoryAttributes: rng.next()))
    }
    for _ in 0..<(rng.next() % 6) {
        n.memoryMaps.append(.init(deviceHandle: u32(), physicalID: u16(), regionID: u16(), spaRangeIndex: u16(),
                                  controlRegionIndex: u16(), regionSize: rng.next(), regionOffset: rng.next(),
                                  physicalAddressBase: rng.next(), interleaveIndex: u16(), interleaveWays: u16(),
                                  stateFlags: u16()))
    }
    for _ in 0..<(rng.next() % 3) {
        let short = rng.next() % 3 == 0
        n.controlRegions.append(.init(index: u16(), vendorID: u16(), deviceID: u16(), revisionID: u16(),
                                      subsystemVendorID: u16(), subsystemDeviceID: u16(), subsystemRevisionID: u16(),
                                      validFields: UInt8(truncatingIfNeeded: rng.next()),
                                      manufacturingLocation: UInt8(truncatingIfNeeded: rng.next()),
                                      manufacturingDate: u16(), serialNumber: u32(), formatInterfaceCode: u16(),
                                      windows: short ? 0 : u16(), windowSize: short ? 0 : rng.next(),
                                      commandOffset: short ? 0 : rng.next(), commandSize: short ? 0 : rng.next(),
                                      statusOffset: short ? 0 : rng.next(), statusSize: short ? 0 : rng.next(),
                                      flags: short ? 0 : u16(), short: short))
    }
    for _ in 0..<(rng.next() % 5) {
        n.flushHints.append(.init(deviceHandle: u32(), addresses: (0..<(rng.next() % 5)).map { _ in rng.next() }))
    }
    if rng.next() % 2 == 0 {
        n.platformCapabilities = .init(highestValid: UInt8(truncatingIfNeeded: rng.next()), capabilities: u32())
    }
    let otherTypes: [UInt16] = [2, 3, 5, 8, 9, 0x7FFF, 0xFFFF]
    for _ in 0..<(rng.next() % 3) {
        n.otherStructures.append(.init(type: otherTypes[Int(rng.next() % UInt64(otherTypes.count))],
                                       bytes: bytes(Int(rng.next() % 40))))
    }
    return n
}

@Suite struct NFITTests {
    @Test func parsesIASLFixture() throws {
        let bytes = try fixtureBytes("nfit/nfit.aml")
        #expect(bytes.count == 636)
        let nfit = try NFIT.parse(bytes)
        #expect(nfit == expectedWPQFixture())
        #expect(nfit.spaRanges.map(\.isPersistentMemory) == [true, true, false])
        #expect(nfit.platformCapabilities?.cacheFlushOnPowerLoss == false)
        // Bit 1 is set but beyond the highest valid capability (0): it does not count.
        #expect(nfit.platformCapabilities?.memoryControllerFlushOnPowerLoss == false)
        let adr = try NFIT.parse(try fixtureBytes("nfit/nfit-adr.aml"))
        #expect(adr == expectedWPQFixture(highestValid: 1, oemTableID: "NPTKADR "))
        #expect(adr.platformCapabilities?.memoryControllerFlushOnPowerLoss == true)
        #expect(adr.platformCapabilities?.cacheFlushOnPowerLoss == false)
        #expect(adr.platformCapabilities?.hardwareMirroring == false)
    }

    @Test func deviceHandleFields() {
        let h = NFIT.DeviceHandle(0x0ABC_1234)
        #expect(h.dimm == 4 && h.channel == 3 && h.controller == 2 && h.socket == 1 && h.node == 0xABC)
        #expect(h.controllerKey == 0x0ABC_1200)
        #expect(NFIT.DeviceHandle(0xF000_0011).controllerKey == 0)
        #expect(NFIT.DeviceHandle(0x0011).controllerKey == NFIT.DeviceHandle(0x0001).controllerKey)
        #expect(NFIT.DeviceHandle(0x1001).controllerKey != NFIT.DeviceHandle(0x0001).controllerKey)
    }

    @Test func platformCapabilityBitsCountOnlyUpToHighestValid() {
        #expect(NFIT.PlatformCapabilities(highestValid: 0, capabilities: 1).cacheFlushOnPowerLoss)
        #expect(!NFIT.PlatformCapabilities(highestValid: 1, capabilities: 4).hardwareMirroring)
        #expect(NFIT.PlatformCapabilities(highestValid: 2, capabilities: 7).hardwareMirroring)
        #expect(NFIT.PlatformCapabilities(highestValid: 255, capabilities: 2).memoryControllerFlushOnPowerLoss)
        #expect(!NFIT.PlatformCapabilities(highestValid: 255, capabilities: .max).has(bit: 32))
    }

    @Test func fixtureReencodes() throws {
        let bytes = try fixtureBytes("nfit/nfit.aml")
        let nfit = try NFIT.parse(bytes)
        let encoded = nfit.encode()
        // Same structures (the interleave structure moves after the others), same length.
        #expect(encoded.count == bytes.count)
        #expect(try NFIT.parse(encoded) == nfit)
        // Reordering does not change the byte sum: the header, checksum included, is identical.
        #expect(Array(encoded[0..<40]) == Array(bytes[0..<40]))
    }

    @Test(arguments: [UInt64(1), 2, 3])
    func randomRoundTrip(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        for _ in 0..<200 {
            let n = randomNFIT(&rng)
            let bytes = n.encode()
            #expect(Int(UInt32(bytes[4]) | UInt32(bytes[5]) << 8 | UInt32(bytes[6]) << 16 | UInt32(bytes[7]) << 24) == bytes.count)
            #expect(bytes.reduce(UInt8(0), &+) == 0)
            #expect(Array(bytes[0..<4]) == Array("NFIT".utf8))
            let back = try NFIT.parse(bytes)
            #expect(back == n)
            // Bytes beyond the header's length are ignored.
            #expect(try NFIT.parse(bytes + [0xFF, 0x00, 0x13]) == n)
        }
    }

    @Test func encodeNormalizesFixedFields() throws {
        let n = NFIT(header: .init(oemID: Array("AB".utf8), oemTableID: Array("0123456789".utf8)),
                     spaRanges: [.init(index: 1, typeGUID: [1, 2, 3])])
        let back = try NFIT.parse(n.encode())
        #expect(back.header.oemID == Array("AB    ".utf8))
        #expect(back.header.oemTableID == Array("01234567".utf8))
        #expect(back.spaRanges[0].typeGUID == [1, 2, 3] + [UInt8](repeating: 0, count: 13))
        let empty = NFIT().encode()
        #expect(empty.count == 40)
        #expect(try NFIT.parse(empty) == NFIT())
    }

    @Test func everyTruncationThrows() throws {
        let bytes = try fixtureBytes("nfit/nfit.aml")
        for n in 0..<bytes.count {
            let e = nfitParseError(Array(bytes.prefix(n)))
            #expect(e?.code == .invalidArgument, "prefix \(n)")
        }
        // The length field shortened (checksum fixed): throws unless it ends at a structure boundary.
        for n in 0..<bytes.count {
            var b = bytes
            setLE(&b, 4, UInt64(n), width: 4)
            fixChecksum(&b)
            let e = nfitParseError(b)
            if fixtureStructureOffsets.contains(n) {
                #expect(e == nil, "length \(n)")
            } else {
                #expect(e?.code == .invalidArgument, "length \(n)")
            }
        }
    }

    @Test func corruptionsThrowWithOffsets() throws {
        let good = try fixtureBytes("nfit/nfit.aml")
        func corrupt(_ fix: Bool = true, _ change: (inout [UInt8]) -> Void) -> NPTError? {
            var b = good
            change(&b)
            if fix { fixChecksum(&b) }
            return nfitParseError(b)
        }
        func expectError(_ e: NPTError?, _ fragments: [String], sourceLocation: SourceLocation = #_sourceLocation) {
            #expect(e?.code == .invalidArgument, sourceLocation: sourceLocation)
            for f in fragments {
                #expect(e?.message.contains(f) == true, "\(e?.message ?? "no error") lacks \(f)", sourceLocation: sourceLocation)
            }
        }
        expectError(nfitParseError([]), ["0 bytes"])
        expectError(nfitParseError(Array(good.prefix(39))), ["39 bytes"])
        expectError(corrupt(false) { $0[9] ^= 0xFF }, ["checksum", "offset 9", "found 0x5e", "expected 0xa1"])
        expectError(corrupt(false) { $0[100] &+= 1 }, ["checksum", "expected 0xa0"])
        expectError(corrupt { $0[0] = UInt8(ascii: "X") }, ["signature", "\"XFIT\""])
        expectError(corrupt { $0[0] = 0 }, ["signature", "[0x0 0x46 0x49 0x54]"])
        expectError(corrupt { setLE(&$0, 4, 36, width: 4) }, ["length", "offset 4", "36"])
        expectError(corrupt { setLE(&$0, 4, 637, width: 4) }, ["length", "637", "636 bytes"])
        expectError(corrupt { setLE(&$0, 4, 0xFFFF_FFFF, width: 4) }, ["4294967295"])
        // First SPA structure (offset 40): length 0, 2, past the end, wrong.
        expectError(corrupt { setLE(&$0, 42, 0, width: 2) }, ["offset 40", "length 0"])
        expectError(corrupt { setLE(&$0, 42, 2, width: 2) }, ["offset 40", "length 2", "less than 4"])
        expectError(corrupt { setLE(&$0, 42, 0xFFFF, width: 2) }, ["offset 40", "runs past", "636"])
        expectError(corrupt { setLE(&$0, 42, 48, width: 2) }, ["SPA", "offset 40", "48", "expected 56"])
        // First memory map (offset 208): wrong length.
        expectError(corrupt { setLE(&$0, 210, 56, width: 2) }, ["memory device map", "offset 208", "expected 48"])
        // First flush hint structure (offset 468): wrong count, too short.
        expectError(corrupt { setLE(&$0, 476, 3, width: 2) }, ["flush hint", "offset 468", "length 32", "expected 40", "offset 476"])
        expectError(corrupt { setLE(&$0, 476, 0xFFFF, width: 2) }, ["flush hint", "offset 468"])
        expectError(corrupt { setLE(&$0, 470, 8, width: 2) }, ["flush hint", "offset 468", "less than 16"])
        // Platform capabilities (offset 620): too short.
        expectError(corrupt { setLE(&$0, 622, 8, width: 2) }, ["platform capabilities", "offset 620", "less than 16"])
        // A structure header cut by the table end.
        expectError(corrupt { $0 += [0, 0]; setLE(&$0, 4, 638, width: 4) }, ["offset 636", "2 bytes left"])
        // An unknown structure type is kept raw, but its length is still checked.
        expectError(corrupt { setLE(&$0, 448, 0x99, width: 2); setLE(&$0, 450, 3, width: 2) }, ["type 153", "offset 448"])
    }

    /// Control regions (type 4): the 80-byte form field by field, the 32-byte form ACPI allows
    /// without block control windows, and every other length refused with its offset.
    @Test func controlRegions() throws {
        let full = NFIT.ControlRegion(index: 3, vendorID: 0x8086, deviceID: 0x1234, revisionID: 0x0201,
                                      subsystemVendorID: 0x1111, subsystemDeviceID: 0x2222, subsystemRevisionID: 0x3333,
                                      validFields: 1, manufacturingLocation: 0xA5, manufacturingDate: 0x1720,
                                      serialNumber: 0xDEAD_BEEF, formatInterfaceCode: 0x0201, windows: 2,
                                      windowSize: 0x1000, commandOffset: 0x40, commandSize: 8, statusOffset: 0x48,
                                      statusSize: 4, flags: 1)
        let short = NFIT.ControlRegion(index: 4, serialNumber: 7, formatInterfaceCode: 0x0301, short: true)
        let bytes = NFIT(controlRegions: [full, short]).encode()
        #expect(bytes.count == 40 + 80 + 32)
        // The 80-byte structure at offset 40, byte by byte where the layout could go wrong.
        func le(_ o: Int, _ n: Int) -> UInt64 { (0..<n).reduce(0) { $0 | UInt64(bytes[o + $1]) << (8 * UInt64($1)) } }
        #expect(le(40, 2) == 4 && le(42, 2) == 80 && le(44, 2) == 3 && le(46, 2) == 0x8086 && le(48, 2) == 0x1234)
        #expect(le(50, 2) == 0x0201 && le(52, 2) == 0x1111 && le(54, 2) == 0x2222 && le(56, 2) == 0x3333)
        #expect(bytes[58] == 1 && bytes[59] == 0xA5 && le(60, 2) == 0x1720 && le(62, 2) == 0)
        #expect(le(64, 4) == 0xDEAD_BEEF && le(68, 2) == 0x0201 && le(70, 2) == 2 && le(72, 8) == 0x1000)
        #expect(le(80, 8) == 0x40 && le(88, 8) == 8 && le(96, 8) == 0x48 && le(104, 8) == 4 && le(112, 2) == 1)
        #expect(le(114, 6) == 0)
        #expect(le(120, 2) == 4 && le(122, 2) == 32 && le(124, 2) == 4 && le(144, 4) == 7 && le(150, 2) == 0)
        #expect(try NFIT.parse(bytes).controlRegions == [full, short])
        // The short form is only for DIMMs without windows: with windows it is encoded long.
        var windowed = short
        windowed.windows = 1
        #expect(windowed.encodedLength == 80)
        // A 32-byte structure with windows, and other lengths, are refused with the offset.
        var b = bytes
        setLE(&b, 150, 1, width: 2)
        fixChecksum(&b)
        #expect(nfitParseError(b)?.message.contains("control region structure at offset 120 has length 32") == true)
        for bad in [36, 48, 79, 81] {
            var c = NFIT(controlRegions: [full]).encode()
            setLE(&c, 42, UInt64(bad), width: 2)
            c = Array(c.prefix(40 + bad)) + [UInt8](repeating: 0, count: max(0, 40 + bad - c.count))
            setLE(&c, 4, UInt64(c.count), width: 4)
            fixChecksum(&c)
            #expect(nfitParseError(c)?.message.contains("control region structure at offset 40 has length \(bad), expected 80") == true, "length \(bad)")
        }
    }

    @Test func randomCorruptionsNeverCrash() throws {
        let good = try fixtureBytes("nfit/nfit.aml")
        var rng = SplitMix64(seed: 7)
        var thrown = 0
        for _ in 0..<3000 {
            var b = good
            for _ in 0..<(1 + rng.next() % 4) {
                b[Int(rng.next() % UInt64(b.count))] = UInt8(truncatingIfNeeded: rng.next())
            }
            if rng.next() % 2 == 0 { b = Array(b.prefix(Int(rng.next() % UInt64(b.count + 1)))) }
            if b.count >= 10, rng.next() % 4 != 0 { fixChecksum(&b) }
            if nfitParseError(b) != nil { thrown += 1 }
        }
        #expect(thrown > 0)
    }

    /// ACPICA's disassembler reads what `encode()` writes.
    @Test func iaslDisassemblesEncodedTable() throws {
        let iasl = "/usr/bin/iasl"
        guard FileManager.default.isExecutableFile(atPath: iasl) else { return }
        var nfit = expectedWPQFixture()
        nfit.header.oemTableID = Array("ENCODED ".utf8)
        nfit.controlRegions = [.init(index: 9, vendorID: 0x8086, serialNumber: 0x1234_5678, formatInterfaceCode: 0x0301)]
        nfit.flushHints = [.init(deviceHandle: 0x0001, addresses: [0xDEAD_BEEF_0000_1000, 0xDEAD_BEEF_0000_1040]),
                           .init(deviceHandle: 0x1001, addresses: [0x0123_4567_89AB_C000])]
        let bytes = nfit.encode()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("nfit-iasl-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        try Data(bytes).write(to: dir.appendingPathComponent("enc.aml"))
        let p = Process()
        p.executableURL = URL(fileURLWithPath: iasl)
        p.arguments = ["-d", "enc.aml"]
        p.currentDirectoryURL = dir
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        let dsl = try String(contentsOf: dir.appendingPathComponent("enc.dsl"), encoding: .utf8)
        let lengthHex = String(bytes.count, radix: 16, uppercase: true)
        for fragment in ["Signature : \"NFIT\"", "Table Length : " + String(repeating: "0", count: 8 - lengthHex.count) + lengthHex,
                         "Oem ID : \"NPTKIT\"", "Oem Table ID : \"ENCODED \"",
                         "Region Type GUID : 66F0D379-B4F3-4074-AC43-0D3318B78CDB",
                         "Address Range Base : 0000000240000000", "Address Range Length : 0000000100000000",
                         "Subtable Type : 0001 [Memory Range Map]", "Device Handle : 00000111",
                         "Region Offset : 0000000000003000",
                         "Subtable Type : 0006 [Flush Hint Address]", "Hint Count : 0002",
                         "Hint Address : DEADBEEF00001000", "Hint Address : DEADBEEF00001040",
                         "Hint Address : 0123456789ABC000", "Device Handle : 00001001",
                         "Subtable Type : 0007 [Platform Capabilities]", "Capabilities (decoded below) : 00000002",
                         "Subtable Type : 0002 [Interleave Info]", "Line Size : 00001000",
                         "Subtable Type : 0004 [NVDIMM Control Region]", "Region Index : 0009",
                         "Serial Number : 12345678", "Code : 0301"] {
            #expect(dsl.contains(fragment), "iasl -d output lacks \(fragment)")
        }
        #expect(!dsl.lowercased().contains("incorrect checksum"))
        #expect(!dsl.lowercased().contains("error"))
    }
}
