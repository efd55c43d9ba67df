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
package struct HostPersistence: Equatable, Sendable {
    package struct FlushTarget: Hashable, Sendable {
        /// Memory-controller key (`NFIT.DeviceHandle.controllerKey`, or an index for other sources).
        package var controller: UInt32
        /// Physical flush hint address; 0 when the source does not give one (sysfs).
        package var address: UInt64
        package init(controller: UInt32, address: UInt64) { self.controller = controller; self.address = address }
    }

    /// Where a power failure stops losing data (Linux's `persistence_domain`; NFIT platform
    /// capabilities bits 0 and 1). Raw values are the C ABI's `NPT_PMEM_DOMAIN_*`.
    package enum Domain: UInt32, Sendable, CustomStringConvertible {
        /// Only the media: the WPQs (and caches) are lost at a power failure.
        case media = 0
        /// ADR: the memory controllers drain their WPQs at a power failure.
        case memoryController = 1
        /// The CPU caches are flushed too (implies `memoryController`).
        case cpuCache = 2
        /// Whether the WPQs are inside the persistence domain.
        package var holdsWPQ: Bool { self != .media }
        package var description: String {
            switch self {
            case .media: return "media"
            case .memoryController: return "memory_controller"
            case .cpuCache: return "cpu_cache"
            }
        }
    }

    package struct Region: Equatable, Sendable {
        /// See the numbering rule in the type's doc comment.
        package var id: UInt32
        /// The system-physical range.
        package var base: UInt64
        package var size: UInt64
        /// Controller keys behind the region, sorted, unique.
        package var controllers: [UInt32]
        /// One per controller that has flush hints, sorted by controller. NFIT: the first hint address
        /// of the first DIMM (lowest device handle, among that controller's DIMMs in this region that
        /// have hints). sysfs: when `deep_flush` reads "1", one per controller with address 0 (a
        /// physical flush writes the region's `deep_flush`).
        package var flushTargets: [FlushTarget]
        package var needsWPQFlush: Bool
        /// sysfs: path of the region's `deep_flush` file (writing "1" flushes), when it exists.
        package var deepFlushPath: String?
        package var domain: Domain

        package init(id: UInt32, base: UInt64, size: UInt64, controllers: [UInt32] = [],
                    flushTargets: [FlushTarget] = [], needsWPQFlush: Bool = false, deepFlushPath: String? = nil,
                    domain: Domain = .media) {
            self.id = id; self.base = base; self.size = size; self.controllers = controllers
            self.flushTargets = flushTargets; self.needsWPQFlush = needsWPQFlush; self.deepFlushPath = deepFlushPath
            self.domain = domain
        }
    }

    package var regions: [Region]
    /// "nfit", "sysfs", "simulator", or "backend 'NAME'" (an `npt_backend_ops` backend's own discovery).
    package var source: String
    /// Whether any region needs WPQ flushing.
    package var needsWPQFlush: Bool { regions.contains { $0.needsWPQFlush } }

    package init(regions: [Region], source: String) { self.regions = regions; self.source = source }

    /// The persistence domain an NFIT's platform capabilities give (see the type's doc comment).
    package static func domain(of caps: NFIT.PlatformCapabilities?) -> Domain {
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
    package static func checkRanges(_ ranges: [(id: UInt32, base: UInt64, size: UInt64)], source: String) throws(NPTError) {
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
    package static func checkedFromNFIT(_ nfit: NFIT) throws(NPTError) -> HostPersistence {
        let h = fromNFIT(nfit)
        try checkRanges(h.regions.map { ($0.id, $0.base, $0.size) }, source: "NFIT")
        return h
    }

    package static func fromNFIT(_ nfit: NFIT) -> HostPersistence {
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
}
