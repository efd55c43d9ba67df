/// The ACPI NFIT ("NVDIMM Firmware Interface Table", ACPI 6.x section 5.2.25): the firmware's
/// description of the host's persistent memory. Decodes the sub-structures that say where the
/// persistent memory is and how to make writes to it durable (SPA ranges, memory-device maps,
/// control regions, flush hint addresses, platform capabilities); every other sub-structure is
/// kept as raw bytes.
///
/// Layout: the 36-byte ACPI header, 4 reserved bytes, then sub-structures that each begin with
/// `type: u16, length: u16`. All fields are little-endian.
package struct NFIT: Equatable, Sendable {
    /// The standard ACPI table header, without the signature, length and checksum (which `encode()`
    /// computes).
    package struct Header: Equatable, Sendable {
        package var revision: UInt8
        /// 6 bytes (`encode()` pads with spaces or truncates).
        package var oemID: [UInt8]
        /// 8 bytes.
        package var oemTableID: [UInt8]
        package var oemRevision: UInt32
        /// 4 bytes.
        package var creatorID: [UInt8]
        package var creatorRevision: UInt32

        package init(revision: UInt8 = 1, oemID: [UInt8] = Array("NPTKIT".utf8),
                    oemTableID: [UInt8] = Array("NPTKNFIT".utf8), oemRevision: UInt32 = 1,
                    creatorID: [UInt8] = Array("NPTK".utf8), creatorRevision: UInt32 = 1) {
            self.revision = revision; self.oemID = oemID; self.oemTableID = oemTableID
            self.oemRevision = oemRevision; self.creatorID = creatorID; self.creatorRevision = creatorRevision
        }
    }

    /// Type 0, 56 bytes: a System Physical Address range.
    package struct SPARange: Equatable, Sendable {
        /// SPA range structure index (memory-device maps refer to it; 0 is reserved).
        package var index: UInt16
        /// Bit 0: control region for hot add only; bit 1: proximity domain valid.
        package var flags: UInt16
        package var proximityDomain: UInt32
        /// Address range type GUID, 16 bytes in table (mixed-endian) order; see `NFIT.persistentMemoryGUID`.
        package var typeGUID: [UInt8]
        package var base: UInt64
        package var length: UInt64
        /// Address range memory mapping attribute (EFI memory attributes, e.g. 0x8008 = WB | NV).
        package var memoryAttributes: UInt64

        package init(index: UInt16 = 0, flags: UInt16 = 0, proximityDomain: UInt32 = 0,
                    typeGUID: [UInt8] = NFIT.persistentMemoryGUID, base: UInt64 = 0, length: UInt64 = 0,
                    memoryAttributes: UInt64 = 0) {
            self.index = index; self.flags = flags; self.proximityDomain = proximityDomain
            self.typeGUID = typeGUID; self.base = base; self.length = length
            self.memoryAttributes = memoryAttributes
        }

        /// Whether this range is persistent memory (its type GUID is `NFIT.persistentMemoryGUID`).
        package var isPersistentMemory: Bool { typeGUID == NFIT.persistentMemoryGUID }
    }

    /// Type 1, 48 bytes: Memory Device to System Physical Address Range Map (NVDIMM region mapping):
    /// which NVDIMM backs (part of) which SPA range.
    package struct MemoryDeviceMap: Equatable, Sendable {
        /// The NFIT device handle of the DIMM; see `DeviceHandle`.
        package var deviceHandle: UInt32
        package var physicalID: UInt16
        package var regionID: UInt16
        package var spaRangeIndex: UInt16
        package var controlRegionIndex: UInt16
        package var regionSize: UInt64
        package var regionOffset: UInt64
        package var physicalAddressBase: UInt64
        package var interleaveIndex: UInt16
        package var interleaveWays: UInt16
        package var stateFlags: UInt16

        package init(deviceHandle: UInt32 = 0, physicalID: UInt16 = 0, regionID: UInt16 = 0,
                    spaRangeIndex: UInt16 = 0, controlRegionIndex: UInt16 = 0, regionSize: UInt64 = 0,
                    regionOffset: UInt64 = 0, physicalAddressBase: UInt64 = 0, interleaveIndex: UInt16 = 0,
                    interleaveWays: UInt16 = 0, stateFlags: UInt16 = 0) {
            self.deviceHandle = deviceHandle; self.physicalID = physicalID; self.regionID = regionID
            self.spaRangeIndex = spaRangeIndex; self.controlRegionIndex = controlRegionIndex
            self.regionSize = regionSize; self.regionOffset = regionOffset
            self.physicalAddressBase = physicalAddressBase; self.interleaveIndex = interleaveIndex
            self.interleaveWays = interleaveWays; self.stateFlags = stateFlags
        }

        package var handle: DeviceHandle { DeviceHandle(deviceHandle) }
    }

    /// Type 4, 80 bytes (or 32, see `short`): NVDIMM Control Region. Describes one function
    /// interface of a DIMM (its identity and, for block-window DIMMs, its control windows); a
    /// memory-device map names it by `index` (its `controlRegionIndex`). Field order and sizes as in
    /// ACPI 6.2 Errata A §5.2.25.6 (the same in 6.3 and 6.4).
    package struct ControlRegion: Equatable, Sendable {
        /// NVDIMM Control Region structure index (memory-device maps refer to it; 0 is reserved).
        package var index: UInt16
        package var vendorID: UInt16
        package var deviceID: UInt16
        package var revisionID: UInt16
        package var subsystemVendorID: UInt16
        package var subsystemDeviceID: UInt16
        package var subsystemRevisionID: UInt16
        /// Bit 0: the manufacturing location and date are valid.
        package var validFields: UInt8
        package var manufacturingLocation: UInt8
        package var manufacturingDate: UInt16
        package var serialNumber: UInt32
        /// Region format interface code (JEDEC; 0x0301: byte-addressable, energy backed).
        package var formatInterfaceCode: UInt16
        /// Number of block control windows (0: a persistent-memory-only DIMM).
        package var windows: UInt16
        package var windowSize: UInt64
        package var commandOffset: UInt64
        package var commandSize: UInt64
        package var statusOffset: UInt64
        package var statusSize: UInt64
        /// Bit 0: block data windows need a buffered command.
        package var flags: UInt16
        /// The 32-byte form, which stops after `windows` (allowed only when `windows` is 0). The
        /// block-window fields then read as 0; `encode()` writes 80 bytes unless this is set and
        /// `windows` is 0.
        package var short: Bool

        package init(index: UInt16 = 0, vendorID: UInt16 = 0, deviceID: UInt16 = 0, revisionID: UInt16 = 0,
                    subsystemVendorID: UInt16 = 0, subsystemDeviceID: UInt16 = 0, subsystemRevisionID: UInt16 = 0,
                    validFields: UInt8 = 0, manufacturingLocation: UInt8 = 0, manufacturingDate: UInt16 = 0,
                    serialNumber: UInt32 = 0, formatInterfaceCode: UInt16 = 0, windows: UInt16 = 0,
                    windowSize: UInt64 = 0, commandOffset: UInt64 = 0, commandSize: UInt64 = 0,
                    statusOffset: UInt64 = 0, statusSize: UInt64 = 0, flags: UInt16 = 0, short: Bool = false) {
            self.index = index; self.vendorID = vendorID; self.deviceID = deviceID; self.revisionID = revisionID
            self.subsystemVendorID = subsystemVendorID; self.subsystemDeviceID = subsystemDeviceID
            self.subsystemRevisionID = subsystemRevisionID; self.validFields = validFields
            self.manufacturingLocation = manufacturingLocation; self.manufacturingDate = manufacturingDate
            self.serialNumber = serialNumber; self.formatInterfaceCode = formatInterfaceCode; self.windows = windows
            self.windowSize = windowSize; self.commandOffset = commandOffset; self.commandSize = commandSize
            self.statusOffset = statusOffset; self.statusSize = statusSize; self.flags = flags; self.short = short
        }

        /// The length `encode()` writes: 32 for the short form (only with no windows), else 80.
        package var encodedLength: Int { short && windows == 0 ? 32 : 80 }
    }

    /// Type 6, 16 + 8·n bytes: the flush hint addresses of one DIMM (writing to any of them drains
    /// the memory controller's write pending queue).
    package struct FlushHint: Equatable, Sendable {
        package var deviceHandle: UInt32
        /// At most `NFIT.maxFlushHintAddresses` are encoded.
        package var addresses: [UInt64]

        package init(deviceHandle: UInt32 = 0, addresses: [UInt64] = []) {
            self.deviceHandle = deviceHandle; self.addresses = addresses
        }

        package var handle: DeviceHandle { DeviceHandle(deviceHandle) }
    }

    /// Type 7, 16 bytes: Platform Capabilities. Bit `i` of `capabilities` counts only if
    /// `i <= highestValid`.
    package struct PlatformCapabilities: Equatable, Sendable {
        package var highestValid: UInt8
        /// Bit 0: CPU cache flush to NVDIMM durability on power loss; bit 1: memory controller flush
        /// to NVDIMM durability on power loss (the WPQ is in the persistence domain); bit 2: hardware
        /// mirroring.
        package var capabilities: UInt32

        package init(highestValid: UInt8 = 0, capabilities: UInt32 = 0) {
            self.highestValid = highestValid; self.capabilities = capabilities
        }

        /// Whether capability bit `bit` is both valid and set.
        package func has(bit: Int) -> Bool {
            bit >= 0 && bit < 32 && bit <= Int(highestValid) && capabilities & (UInt32(1) << UInt32(bit)) != 0
        }
        package var cacheFlushOnPowerLoss: Bool { has(bit: 0) }
        package var memoryControllerFlushOnPowerLoss: Bool { has(bit: 1) }
        package var hardwareMirroring: Bool { has(bit: 2) }
    }

    /// An NFIT device handle: bits 0-3 DIMM number, 4-7 memory channel, 8-11 memory controller ID,
    /// 12-15 socket ID, 16-27 node controller ID.
    package struct DeviceHandle: Hashable, Sendable, CustomStringConvertible {
        package var raw: UInt32
        package init(_ raw: UInt32) { self.raw = raw }
        package var dimm: UInt32 { raw & 0xF }
        package var channel: UInt32 { (raw >> 4) & 0xF }
        package var controller: UInt32 { (raw >> 8) & 0xF }
        package var socket: UInt32 { (raw >> 12) & 0xF }
        package var node: UInt32 { (raw >> 16) & 0xFFF }
        /// Identifies the memory controller: the node, socket and controller bits (`raw & 0x0FFF_FF00`).
        package var controllerKey: UInt32 { raw & 0x0FFF_FF00 }
        package var description: String {
            "handle \(hex(UInt64(raw))) (node \(node) socket \(socket) controller \(controller) channel \(channel) dimm \(dimm))"
        }
    }

    /// A sub-structure that is not decoded: its type and the bytes after its 4-byte type/length
    /// header.
    package struct RawStructure: Equatable, Sendable {
        package var type: UInt16
        /// The structure's bytes after `type` and `length` (`encode()` writes `length = 4 + bytes.count`;
        /// at most 65531 bytes are encoded).
        package var bytes: [UInt8]
        package init(type: UInt16, bytes: [UInt8]) { self.type = type; self.bytes = bytes }
    }

    package static let signature = "NFIT"
    /// Byte offset of the first sub-structure (36-byte header + 4 reserved bytes).
    package static let structuresOffset = 40
    /// The most flush hint addresses one Flush Hint Address structure can hold (its length is a u16).
    package static let maxFlushHintAddresses = (0xFFFF - 16) / 8
    /// The persistent-memory address range type GUID 66F0D379-B4F3-4074-AC43-0D3318B78CDB, in table
    /// byte order (first three fields little-endian).
    package static let persistentMemoryGUID: [UInt8] = [0x79, 0xD3, 0xF0, 0x66, 0xF3, 0xB4, 0x74, 0x40,
                                                       0xAC, 0x43, 0x0D, 0x33, 0x18, 0xB7, 0x8C, 0xDB]
    /// The NVDIMM control region GUID 92F701F6-13B4-405D-910B-299367E8234C, in table byte order.
    package static let controlRegionGUID: [UInt8] = [0xF6, 0x01, 0xF7, 0x92, 0xB4, 0x13, 0x5D, 0x40,
                                                    0x91, 0x0B, 0x29, 0x93, 0x67, 0xE8, 0x23, 0x4C]

    package var header: Header
    package var spaRanges: [SPARange]
    package var memoryMaps: [MemoryDeviceMap]
    package var controlRegions: [ControlRegion]
    package var flushHints: [FlushHint]
    package var platformCapabilities: PlatformCapabilities?
    /// Sub-structures of other types (interleave, SMBIOS, block data window, ...), in table order.
    package var otherStructures: [RawStructure]

    package init(header: Header = Header(), spaRanges: [SPARange] = [], memoryMaps: [MemoryDeviceMap] = [],
                controlRegions: [ControlRegion] = [], flushHints: [FlushHint] = [],
                platformCapabilities: PlatformCapabilities? = nil, otherStructures: [RawStructure] = []) {
        self.header = header; self.spaRanges = spaRanges; self.memoryMaps = memoryMaps
        self.controlRegions = controlRegions; self.flushHints = flushHints
        self.platformCapabilities = platformCapabilities; self.otherStructures = otherStructures
    }

    // MARK: Parsing

    /// Decodes an NFIT. Bytes beyond the header's length field are ignored. Throws
    /// `.invalidArgument` (naming the byte offset) for a short or truncated table, a wrong
    /// signature or checksum, and any sub-structure whose length is zero, below 4, past the end of
    /// the table, or wrong for its type. If the table holds several Platform Capabilities
    /// structures, the last one wins.
    package static func parse(_ bytes: [UInt8]) throws(NPTError) -> NFIT {
        let minimum = structuresOffset
        guard bytes.count >= minimum else {
            throw .invalid("NFIT: \(bytes.count) bytes, fewer than the \(minimum) of the header and reserved field")
        }
        let sig = Array(bytes[0..<4])
        guard sig == Array(signature.utf8) else {
            throw .invalid("NFIT: signature at offset 0 is \(describe(sig)), expected \"NFIT\"")
        }
        let lengthField = u32(bytes, 4)
        guard lengthField >= UInt32(minimum) else {
            throw .invalid("NFIT: table length field at offset 4 is \(lengthField), smaller than \(minimum)")
        }
        guard UInt64(lengthField) <= UInt64(bytes.count) else {
            throw .invalid("NFIT: table length field at offset 4 is \(lengthField), but only \(bytes.count) bytes are given")
        }
        let length = Int(lengthField)
        var sum: UInt8 = 0
        for i in 0..<length { sum &+= bytes[i] }
        if sum != 0 {
            let found = bytes[9]
            let expected = found &- sum
            throw .invalid("NFIT: checksum at offset 9: found \(hex(UInt64(found))), expected \(hex(UInt64(expected))) (the table's \(length) bytes sum to \(hex(UInt64(sum))), not 0)")
        }
        var nfit = NFIT(header: Header(revision: bytes[8], oemID: Array(bytes[10..<16]),
                                       oemTableID: Array(bytes[16..<24]), oemRevision: u32(bytes, 24),
                                       creatorID: Array(bytes[28..<32]), creatorRevision: u32(bytes, 32)))
        var offset = minimum
        while offset < length {
            guard length - offset >= 4 else {
                throw .invalid("NFIT: sub-structure at offset \(offset): only \(length - offset) bytes left before the table end at \(length), fewer than the 4 of its type and length")
            }
            let type = u16(bytes, offset)
            let slen = Int(u16(bytes, offset + 2))
            guard slen != 0 else {
                throw .invalid("NFIT: sub-structure of type \(type) at offset \(offset) has length 0")
            }
            guard slen >= 4 else {
                throw .invalid("NFIT: sub-structure of type \(type) at offset \(offset) has length \(slen), less than 4")
            }
            guard slen <= length - offset else {
                throw .invalid("NFIT: sub-structure of type \(type) at offset \(offset) has length \(slen) and runs past the table end at \(length)")
            }
            let o = offset
            switch type {
            case 0:
                guard slen == 56 else {
                    throw .invalid("NFIT: SPA range structure at offset \(o) has length \(slen), expected 56")
                }
                nfit.spaRanges.append(SPARange(index: u16(bytes, o + 4), flags: u16(bytes, o + 6),
                                               proximityDomain: u32(bytes, o + 12),
                                               typeGUID: Array(bytes[(o + 16)..<(o + 32)]),
                                               base: u64(bytes, o + 32), length: u64(bytes, o + 40),
                                               memoryAttributes: u64(bytes, o + 48)))
            case 1:
                guard slen == 48 else {
                    throw .invalid("NFIT: memory device map structure at offset \(o) has length \(slen), expected 48")
                }
                nfit.memoryMaps.append(MemoryDeviceMap(
                    deviceHandle: u32(bytes, o + 4), physicalID: u16(bytes, o + 8), regionID: u16(bytes, o + 10),
                    spaRangeIndex: u16(bytes, o + 12), controlRegionIndex: u16(bytes, o + 14),
                    regionSize: u64(bytes, o + 16), regionOffset: u64(bytes, o + 24),
                    physicalAddressBase: u64(bytes, o + 32), interleaveIndex: u16(bytes, o + 40),
                    interleaveWays: u16(bytes, o + 42), stateFlags: u16(bytes, o + 44)))
            case 4:
                let windows = u16(bytes, o + 30)
                guard slen == 80 || (slen == 32 && windows == 0) else {
                    throw .invalid("NFIT: control region structure at offset \(o) has length \(slen), expected 80 (or 32 with no block control windows; \(windows) at offset \(o + 30))")
                }
                let long = slen == 80
                nfit.controlRegions.append(ControlRegion(
                    index: u16(bytes, o + 4), vendorID: u16(bytes, o + 6), deviceID: u16(bytes, o + 8),
                    revisionID: u16(bytes, o + 10), subsystemVendorID: u16(bytes, o + 12),
                    subsystemDeviceID: u16(bytes, o + 14), subsystemRevisionID: u16(bytes, o + 16),
                    validFields: bytes[o + 18], manufacturingLocation: bytes[o + 19],
                    manufacturingDate: u16(bytes, o + 20), serialNumber: u32(bytes, o + 24),
                    formatInterfaceCode: u16(bytes, o + 28), windows: windows,
                    windowSize: long ? u64(bytes, o + 32) : 0, commandOffset: long ? u64(bytes, o + 40) : 0,
                    commandSize: long ? u64(bytes, o + 48) : 0, statusOffset: long ? u64(bytes, o + 56) : 0,
                    statusSize: long ? u64(bytes, o + 64) : 0, flags: long ? u16(bytes, o + 72) : 0,
                    short: !long))
            case 6:
                guard slen >= 16 else {
                    throw .invalid("NFIT: flush hint address structure at offset \(o) has length \(slen), less than 16")
                }
                let count = Int(u16(bytes, o + 8))
                guard slen == 16 + 8 * count else {
                    throw .invalid("NFIT: flush hint address structure at offset \(o) has length \(slen), expected \(16 + 8 * count) for its \(count) hint addresses (count at offset \(o + 8))")
                }
                nfit.flushHints.append(FlushHint(deviceHandle: u32(bytes, o + 4),
                                                 addresses: (0..<count).map { u64(bytes, o + 16 + 8 * $0) }))
            case 7:
                guard slen >= 16 else {
                    throw .invalid("NFIT: platform capabilities structure at offset \(o) has length \(slen), less than 16")
                }
                nfit.platformCapabilities = PlatformCapabilities(highestValid: bytes[o + 4], capabilities: u32(bytes, o + 8))
            default:
                nfit.otherStructures.append(RawStructure(type: type, bytes: Array(bytes[(o + 4)..<(o + slen)])))
            }
            offset += slen
        }
        return nfit
    }

    // MARK: Encoding

    /// The table's bytes, with the length and checksum filled in. Structures are written in the order
    /// SPA ranges, memory-device maps, control regions, flush hints, platform capabilities, others. Fixed-size byte
    /// fields (OEM IDs, GUIDs) are padded (with spaces for IDs, zeros for GUIDs) or truncated; a
    /// flush hint structure holds at most `maxFlushHintAddresses` addresses and a raw structure at
    /// most 65531 bytes, the rest is dropped.
    package func encode() -> [UInt8] {
        var out: [UInt8] = []
        out.append(contentsOf: Array(NFIT.signature.utf8))
        put32(&out, 0)                              // length, patched below
        out.append(header.revision)
        out.append(0)                               // checksum, patched below
        out.append(contentsOf: fixed(header.oemID, 6, pad: 0x20))
        out.append(contentsOf: fixed(header.oemTableID, 8, pad: 0x20))
        put32(&out, header.oemRevision)
        out.append(contentsOf: fixed(header.creatorID, 4, pad: 0x20))
        put32(&out, header.creatorRevision)
        put32(&out, 0)                              // reserved
        for r in spaRanges {
            put16(&out, 0); put16(&out, 56)
            put16(&out, r.index); put16(&out, r.flags); put32(&out, 0); put32(&out, r.proximityDomain)
            out.append(contentsOf: fixed(r.typeGUID, 16, pad: 0))
            put64(&out, r.base); put64(&out, r.length); put64(&out, r.memoryAttributes)
        }
        for m in memoryMaps {
            put16(&out, 1); put16(&out, 48)
            put32(&out, m.deviceHandle); put16(&out, m.physicalID); put16(&out, m.regionID)
            put16(&out, m.spaRangeIndex); put16(&out, m.controlRegionIndex)
            put64(&out, m.regionSize); put64(&out, m.regionOffset); put64(&out, m.physicalAddressBase)
            put16(&out, m.interleaveIndex); put16(&out, m.interleaveWays); put16(&out, m.stateFlags); put16(&out, 0)
        }
        for c in controlRegions {
            let length = c.encodedLength
            put16(&out, 4); put16(&out, UInt16(length))
            put16(&out, c.index); put16(&out, c.vendorID); put16(&out, c.deviceID); put16(&out, c.revisionID)
            put16(&out, c.subsystemVendorID); put16(&out, c.subsystemDeviceID); put16(&out, c.subsystemRevisionID)
            out.append(c.validFields); out.append(c.manufacturingLocation); put16(&out, c.manufacturingDate)
            put16(&out, 0)                          // reserved
            put32(&out, c.serialNumber); put16(&out, c.formatInterfaceCode); put16(&out, c.windows)
            if length == 80 {
                put64(&out, c.windowSize); put64(&out, c.commandOffset); put64(&out, c.commandSize)
                put64(&out, c.statusOffset); put64(&out, c.statusSize); put16(&out, c.flags)
                out.append(contentsOf: [UInt8](repeating: 0, count: 6))
            }
        }
        for f in flushHints {
            let addrs = f.addresses.prefix(NFIT.maxFlushHintAddresses)
            put16(&out, 6); put16(&out, UInt16(16 + 8 * addrs.count))
            put32(&out, f.deviceHandle); put16(&out, UInt16(addrs.count))
            out.append(contentsOf: [UInt8](repeating: 0, count: 6))
            for a in addrs { put64(&out, a) }
        }
        if let p = platformCapabilities {
            put16(&out, 7); put16(&out, 16)
            out.append(p.highestValid); out.append(contentsOf: [0, 0, 0])
            put32(&out, p.capabilities); put32(&out, 0)
        }
        for s in otherStructures {
            let body = s.bytes.prefix(0xFFFF - 4)
            put16(&out, s.type); put16(&out, UInt16(4 + body.count))
            out.append(contentsOf: body)
        }
        let length = UInt32(truncatingIfNeeded: out.count)
        for i in 0..<4 { out[4 + i] = UInt8(truncatingIfNeeded: length >> (8 * UInt32(i))) }
        var sum: UInt8 = 0
        for b in out { sum &+= b }
        out[9] = 0 &- sum
        return out
    }
}

// MARK: Little-endian helpers (callers check bounds first; out-of-range bytes read as 0)

@inline(__always) private func byte(_ b: [UInt8], _ i: Int) -> UInt8 { i >= 0 && i < b.count ? b[i] : 0 }
private func u16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(byte(b, o)) | UInt16(byte(b, o &+ 1)) << 8 }
private func u32(_ b: [UInt8], _ o: Int) -> UInt32 { UInt32(u16(b, o)) | UInt32(u16(b, o &+ 2)) << 16 }
private func u64(_ b: [UInt8], _ o: Int) -> UInt64 { UInt64(u32(b, o)) | UInt64(u32(b, o &+ 4)) << 32 }
private func put16(_ out: inout [UInt8], _ v: UInt16) { out.append(UInt8(v & 0xFF)); out.append(UInt8(v >> 8)) }
private func put32(_ out: inout [UInt8], _ v: UInt32) { put16(&out, UInt16(v & 0xFFFF)); put16(&out, UInt16(v >> 16)) }
private func put64(_ out: inout [UInt8], _ v: UInt64) { put32(&out, UInt32(v & 0xFFFF_FFFF)); put32(&out, UInt32(v >> 32)) }
private func fixed(_ b: [UInt8], _ n: Int, pad: UInt8) -> [UInt8] {
    Array(b.prefix(n)) + [UInt8](repeating: pad, count: max(0, n - b.count))
}
private func describe(_ b: [UInt8]) -> String {
    let printable = b.allSatisfy { $0 >= 0x20 && $0 < 0x7F }
    if printable { return "\"" + String(decoding: b, as: UTF8.self) + "\"" }
    return "[" + b.map { hex(UInt64($0)) }.joined(separator: " ") + "]"
}
