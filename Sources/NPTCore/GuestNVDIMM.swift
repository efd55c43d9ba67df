/// What a guest needs to see its NVDIMMs: the NFIT (ACPI 6.x §5.2.25) and the ACPI namespace
/// devices for them (an SSDT with the NVDIMM root device, ACPI 6.0 §9.20), both built from one
/// description so that they cannot disagree.
///
/// Section numbers are those of ACPI 6.2 Errata A (unchanged in 6.3 and 6.4) for the NFIT and ACPI
/// 6.0 for the namespace devices. "Linux" is the guest kernel's `drivers/acpi/nfit` (core.c), which
/// a real Debian 6.1 kernel exercises in `Tests/Linux/boot_nvdimm.sh`. The rules, each checked by
/// `GuestNVDIMM.violations(nfit:ssdtHandles:)` and by NFITTests/GuestNVDIMMTests:
///
/// - **T1 Table** (§5.2.6, §5.2.25): the 36-byte header with signature "NFIT", revision 1, the
///   table's length, a checksum that makes all its bytes sum to 0; 4 reserved bytes; then the
///   structures, each `type: u16, length: u16`.
/// - **T2 Lengths** (§5.2.25.2, .3, .6, .8, .9): SPA range 56 bytes, memory-device map 48, control
///   region 80 (32 allowed only with no block control windows), flush hint address 16 + 8·n,
///   platform capabilities 16. Linux compares these lengths with its structure sizes and fails the
///   whole table on a mismatch (a flush hint structure shorter than 24 bytes, i.e. without an
///   address, included): no region at all.
/// - **T3 SPA ranges** (§5.2.25.2): one per NVDIMM range, range index non-zero and unique (0 is
///   reserved), the persistent-memory type GUID 66F0D379-B4F3-4074-AC43-0D3318B78CDB, memory
///   attributes EFI_MEMORY_WB | EFI_MEMORY_NV (0x8008), 4 KiB aligned, not overlapping each other
///   (the core already keeps them off RAM and the vFHA page). Linux registers one region per
///   persistent-memory range.
/// - **T4 Memory-device maps** (§5.2.25.3): one per DIMM, naming an existing SPA range and a
///   non-zero control region index that an existing control region has; one DIMM per range
///   (interleave ways 1, region offset 0, region size = the range's length). Linux reads the control
///   region of every DIMM a map names: with index 0 (no control region) it dereferences a missing
///   structure (the NULL-pointer oops of a table without control regions); with an index no
///   structure has, it refuses the range ("SPA n missing DCR m").
/// - **T5 Control regions** (§5.2.25.6): one per DIMM (an NFIT device handle), index non-zero and
///   unique, no block control windows (byte-addressable persistent memory only), format interface
///   code 0x0301 (byte-addressable), a serial number unique among the DIMMs (Linux builds the
///   nmem's id and the interleave-set cookie from vendor and serial). NPTKit has no PCI vendor ID:
///   vendor and device IDs are 0.
/// - **T6 Flush hints** (§5.2.25.8): one Flush Hint Address structure per DIMM handle, at least one
///   address, every address the VM's vFHA; the vFHA page is outside RAM and every SPA range (the
///   core allocates it so). Linux then gives the region a writable `deep_flush` reading 1, claims
///   the hint page in /proc/iomem, and writes it after a write barrier on every flush.
/// - **T7 Platform capabilities** (§5.2.25.9): exactly one structure, highest valid capability 1
///   (bits 0 and 1 described), bit 1 (memory controller flush on power loss) set exactly when no
///   host region behind the VM needs WPQ flushing, bit 0 (CPU cache flush) set only when every
///   such region's domain is `cpu_cache`, and never without bit 1 (§5.2.25.9: bit 0 implies bit 1).
///   Linux: bit 0 gives `persistence_domain` "cpu_cache", else bit 1 "memory_controller", else no
///   `persistence_domain` attribute; so an ADR host's table differs from one that needs flushing.
/// - **T8 Handles and namespace** (ACPI 6.0 §9.20; §5.2.25.3 device handle): device handles unique
///   per DIMM; the SSDT holds, in `\_SB`, one device with `_HID` "ACPI0012" (the NVDIMM root device
///   Linux's nfit driver binds to) and one child per device handle whose `_ADR` is that handle.
///   Linux looks each DIMM up by `_ADR` and disables a DIMM without one ("no ACPI.NFIT device with
///   _ADR ..."), and then registers no region for its range.
package struct GuestNVDIMM: Equatable, Sendable {
    /// One virtual DIMM: an NVDIMM range of the VM.
    package struct DIMM: Equatable, Sendable {
        /// NFIT device handle (also the `_ADR` of its namespace device).
        package var handle: UInt32
        /// Guest-physical base and length of its range.
        package var base: UInt64
        package var size: UInt64
        package init(handle: UInt32, base: UInt64, size: UInt64) { self.handle = handle; self.base = base; self.size = size }
    }

    package var dimms: [DIMM]
    /// The virtual flush hint address, every DIMM's flush hint.
    package var flushHint: UInt64
    /// The persistence domain the guest is told (T7).
    package var domain: HostPersistence.Domain

    package init(dimms: [DIMM], flushHint: UInt64, domain: HostPersistence.Domain) {
        self.dimms = dimms; self.flushHint = flushHint; self.domain = domain
    }

    /// The NFIT device handle of virtual DIMM `i`: DIMM number `i & 0xF`, channel `(i >> 4) & 0xF`,
    /// memory controller 0, socket 0, node 0.
    package static func handle(ofDIMM i: Int) -> UInt32 { UInt32(i & 0xF) | UInt32((i >> 4) & 0xF) << 4 }

    /// The persistence domain a guest is told for NVDIMM ranges backed by `regions` (T7): `.media`
    /// if one of them needs WPQ flushing, `.cpuCache` if all hold the CPU caches, else
    /// `.memoryController` (a region without flush hints has nothing to flush: as Linux does for
    /// such a platform, it counts as ADR).
    package static func guestDomain(backedBy regions: [HostPersistence.Region]) -> HostPersistence.Domain {
        if regions.isEmpty || regions.contains(where: \.needsWPQFlush) { return .media }
        return regions.allSatisfy { $0.domain == .cpuCache } ? .cpuCache : .memoryController
    }

    /// Highest valid capability of the guest's Platform Capabilities structure (T7).
    package static let highestValidCapability: UInt8 = 1
    /// Control region format interface code: byte-addressable (T5).
    package static let formatInterfaceCode: UInt16 = 0x0301
    /// EFI_MEMORY_WB | EFI_MEMORY_NV (T3).
    package static let memoryAttributes: UInt64 = 0x8 | 0x8000
    /// The NVDIMM root device's hardware ID (T8).
    package static let rootHID = "ACPI0012"
    /// The root device's name in `\_SB`, and its children's names (NV00, NV01, ...).
    package static let rootName = "NVDR"
    package static func childName(_ i: Int) -> String {
        let digits = Array("0123456789ABCDEF")
        return "NV" + String(digits[(i >> 4) & 0xF]) + String(digits[i & 0xF])
    }
    /// At most this many DIMMs (two hex digits of child name; `PersistenceState.maxRanges` is lower).
    package static let maxDIMMs = 256

    /// The NFIT (T1-T7): per DIMM `i`, SPA range `i + 1`, a memory-device map, control region
    /// `i + 1` and a flush hint structure naming the vFHA; then the platform capabilities.
    package func nfit() -> NFIT {
        var t = NFIT()
        for (i, d) in dimms.enumerated() {
            let index = UInt16(truncatingIfNeeded: i + 1)
            t.spaRanges.append(NFIT.SPARange(index: index, flags: 0, proximityDomain: 0, typeGUID: NFIT.persistentMemoryGUID,
                                             base: d.base, length: d.size, memoryAttributes: Self.memoryAttributes))
            t.memoryMaps.append(NFIT.MemoryDeviceMap(deviceHandle: d.handle, physicalID: UInt16(truncatingIfNeeded: i),
                                                     regionID: 0, spaRangeIndex: index, controlRegionIndex: index,
                                                     regionSize: d.size, regionOffset: 0, physicalAddressBase: 0,
                                                     interleaveIndex: 0, interleaveWays: 1, stateFlags: 0))
            t.controlRegions.append(NFIT.ControlRegion(index: index, revisionID: 1, serialNumber: UInt32(i + 1),
                                                       formatInterfaceCode: Self.formatInterfaceCode, windows: 0))
            t.flushHints.append(NFIT.FlushHint(deviceHandle: d.handle, addresses: [flushHint]))
        }
        var caps: UInt32 = 0
        if domain == .cpuCache { caps |= 1 }
        if domain.holdsWPQ { caps |= 2 }
        t.platformCapabilities = NFIT.PlatformCapabilities(highestValid: Self.highestValidCapability, capabilities: caps)
        return t
    }

    /// The SSDT (T8): `Scope (\_SB) { Device (NVDR) { Name (_HID, "ACPI0012")
    /// Device (NV00) { Name (_ADR, handle0) } ... } }`.
    package func ssdt() throws(NPTError) -> [UInt8] {
        guard dimms.count <= Self.maxDIMMs else { throw .invalid("\(dimms.count) DIMMs, at most \(Self.maxDIMMs)") }
        var root = try AML.name("_HID", try AML.string(Self.rootHID))
        for (i, d) in dimms.enumerated() {
            root += try AML.device(Self.childName(i), try AML.name("_ADR", AML.integer(UInt64(d.handle))))
        }
        let body = try AML.rootScope("_SB", try AML.device(Self.rootName, root))
        return AML.definitionBlock(signature: "SSDT", revision: 2, oemTableID: "NPTKNVDM", body: body)
    }

    // MARK: the rules as a check

    /// The rules T1-T8 (the type's doc comment) that `nfit` breaks, one line each, naming the rule
    /// and the structure; empty when it obeys all of them. `ssdtHandles` are the `_ADR`s of the
    /// NVDIMM root device's children (T8; nil: not checked). `table` is the encoded NFIT, for T1 and
    /// T2 (nil: checked on `nfit.encode()`, which writes correct lengths).
    package static func violations(nfit t: NFIT, table: [UInt8]? = nil, ssdtHandles: [UInt32]? = nil,
                                  flushHint: UInt64? = nil) -> [String] {
        var v: [String] = []
        let bytes = table ?? t.encode()
        // T1, T2 on the bytes.
        if bytes.count < 40 || Array(bytes.prefix(4)) != Array("NFIT".utf8) { v.append("T1: no NFIT header") }
        else {
            let length = Int(UInt32(bytes[4]) | UInt32(bytes[5]) << 8 | UInt32(bytes[6]) << 16 | UInt32(bytes[7]) << 24)
            if length != bytes.count { v.append("T1: header length \(length), table \(bytes.count) bytes") }
            if bytes[8] != 1 { v.append("T1: revision \(bytes[8]), expected 1") }
            if bytes.reduce(UInt8(0), &+) != 0 { v.append("T1: checksum: the bytes do not sum to 0") }
            var o = 40
            while o + 4 <= min(length, bytes.count) {
                let type = UInt16(bytes[o]) | UInt16(bytes[o + 1]) << 8
                let len = Int(UInt16(bytes[o + 2]) | UInt16(bytes[o + 3]) << 8)
                let expected: Int?
                switch type {
                case 0: expected = 56
                case 1: expected = 48
                case 4: expected = o + 31 < bytes.count && bytes[o + 30] == 0 && bytes[o + 31] == 0 && len == 32 ? 32 : 80
                case 6:
                    let n = o + 9 < bytes.count ? Int(UInt16(bytes[o + 8]) | UInt16(bytes[o + 9]) << 8) : 0
                    expected = 16 + 8 * max(n, 1)
                case 7: expected = 16
                default: expected = nil
                }
                if let e = expected, e != len { v.append("T2: structure type \(type) at offset \(o) has length \(len), expected \(e)") }
                if len < 4 { break }
                o += len
            }
        }
        // T3
        var spaIndexes = Set<UInt16>()
        for r in t.spaRanges {
            if r.index == 0 { v.append("T3: SPA range with index 0") }
            if !spaIndexes.insert(r.index).inserted { v.append("T3: SPA range index \(r.index) twice") }
            if !r.isPersistentMemory { v.append("T3: SPA range \(r.index) is not persistent memory") }
            if r.memoryAttributes != memoryAttributes { v.append("T3: SPA range \(r.index) memory attributes \(hex(r.memoryAttributes))") }
            if r.base % 0x1000 != 0 || r.length % 0x1000 != 0 || r.length == 0 {
                v.append("T3: SPA range \(r.index) [\(hex(r.base)), +\(hex(r.length))) is not 4 KiB aligned and non-empty")
            }
            for s in t.spaRanges where s.index > r.index && s.base < r.base &+ r.length && r.base < s.base &+ s.length {
                v.append("T3: SPA ranges \(r.index) and \(s.index) overlap")
            }
        }
        // T4
        let dcrIndexes = t.controlRegions.map(\.index)
        for r in t.spaRanges where t.memoryMaps.filter({ $0.spaRangeIndex == r.index }).count != 1 {
            v.append("T4: SPA range \(r.index) has \(t.memoryMaps.filter { $0.spaRangeIndex == r.index }.count) memory-device maps, expected 1")
        }
        for m in t.memoryMaps {
            let h = hex(UInt64(m.deviceHandle))
            guard let r = t.spaRanges.first(where: { $0.index == m.spaRangeIndex }) else {
                v.append("T4: map of handle \(h) names SPA range \(m.spaRangeIndex), which does not exist"); continue
            }
            if m.controlRegionIndex == 0 { v.append("T4: map of handle \(h) has control region index 0") }
            else if !dcrIndexes.contains(m.controlRegionIndex) {
                v.append("T4: map of handle \(h) names control region \(m.controlRegionIndex), which does not exist")
            }
            if m.interleaveWays != 1 || m.regionOffset != 0 || m.regionSize != r.length {
                v.append("T4: map of handle \(h) is not one whole DIMM (ways \(m.interleaveWays), offset \(hex(m.regionOffset)), size \(hex(m.regionSize)))")
            }
        }
        // T5
        var seenDCR = Set<UInt16>(), serials = Set<UInt32>()
        for c in t.controlRegions {
            if c.index == 0 { v.append("T5: control region with index 0") }
            if !seenDCR.insert(c.index).inserted { v.append("T5: control region index \(c.index) twice") }
            if c.windows != 0 { v.append("T5: control region \(c.index) has \(c.windows) block control windows") }
            if c.formatInterfaceCode != formatInterfaceCode { v.append("T5: control region \(c.index) format interface code \(hex(UInt64(c.formatInterfaceCode)))") }
            if !serials.insert(c.serialNumber).inserted { v.append("T5: serial number \(c.serialNumber) twice") }
        }
        let handles = t.memoryMaps.map(\.deviceHandle)
        let dcrOfHandle = Dictionary(t.memoryMaps.map { ($0.deviceHandle, $0.controlRegionIndex) }, uniquingKeysWith: { a, _ in a })
        if Set(dcrOfHandle.values).count != dcrOfHandle.count || t.controlRegions.count != Set(handles).count {
            v.append("T5: \(t.controlRegions.count) control regions for \(Set(handles).count) DIMMs (one each expected)")
        }
        // T6
        for h in Set(handles).sorted() {
            let f = t.flushHints.filter { $0.deviceHandle == h }
            if f.count != 1 { v.append("T6: handle \(hex(UInt64(h))) has \(f.count) flush hint structures, expected 1"); continue }
            if f[0].addresses.isEmpty { v.append("T6: handle \(hex(UInt64(h))) has no flush hint address") }
            if let flushHint, f[0].addresses.contains(where: { $0 != flushHint }) {
                v.append("T6: handle \(hex(UInt64(h))) names a flush hint other than the vFHA \(hex(flushHint))")
            }
            for a in f[0].addresses {
                for r in t.spaRanges where a & ~0xFFF < r.base &+ r.length && r.base < (a & ~0xFFF) + 0x1000 {
                    v.append("T6: flush hint \(hex(a)) is in SPA range \(r.index)")
                }
            }
        }
        for f in t.flushHints where !handles.contains(f.deviceHandle) {
            v.append("T6: flush hint structure for handle \(hex(UInt64(f.deviceHandle))), which no map names")
        }
        // T7
        if let p = t.platformCapabilities {
            if p.highestValid != highestValidCapability { v.append("T7: highest valid capability \(p.highestValid), expected \(highestValidCapability)") }
            if p.cacheFlushOnPowerLoss && !p.memoryControllerFlushOnPowerLoss { v.append("T7: bit 0 (CPU cache flush) without bit 1") }
        } else {
            v.append("T7: no platform capabilities structure")
        }
        if bytes.count >= 40 {
            var o = 40, caps = 0
            while o + 4 <= bytes.count {
                let len = Int(UInt16(bytes[o + 2]) | UInt16(bytes[o + 3]) << 8)
                if bytes[o] == 7 && bytes[o + 1] == 0 { caps += 1 }
                if len < 4 { break }
                o += len
            }
            if caps > 1 { v.append("T7: \(caps) platform capabilities structures") }
        }
        // T8
        if Set(handles).count != handles.count { v.append("T8: a device handle has two memory-device maps") }
        if let ssdtHandles {
            for h in handles where !ssdtHandles.contains(h) { v.append("T8: handle \(hex(UInt64(h))) has no namespace device with that _ADR") }
            for h in ssdtHandles where !handles.contains(h) { v.append("T8: namespace device _ADR \(hex(UInt64(h))) names no DIMM") }
        }
        return v
    }
}
