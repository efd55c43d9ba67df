import Synchronization

/// Virtualized NVDIMM write-pending-queue (WPQ) flushing (design.md, the third technique).
///
/// Each VM gets one virtual flush hint address (vFHA): a guest-physical page outside its RAM, its
/// NVDIMM ranges and every other reservation, named in the guest's NFIT as the flush hint of every
/// virtual DIMM. It is tied to the physical flush hints of exactly the memory controllers behind the
/// host regions that back the VM's NVDIMM ranges.
///
/// Decisions (the core decides, the backend does):
/// - if a backing host region needs WPQ flushing, the vFHA page is mapped read-only in every shadow
///   hierarchy: a guest write exits (an EPT violation on a write), and the core fences the vCPU's
///   earlier stores, writes each associated physical flush hint once, completes the guest's write
///   and resumes the vCPU;
/// - if none does, the vFHA is mapped read-write to a scratch page: guest writes cost no exit;
/// - concurrent guest flushes are coalesced per physical flush hint: a physical flush that starts
///   after a guest's write was made (and fenced) satisfies that write.

/// One NVDIMM range of a VM.
package struct NVDIMMRange: Sendable, Equatable, CustomStringConvertible {
    /// Guest-physical range.
    package var range: GPARange
    /// The host region backing it (`HostPersistence.Region.id`) and the offset into that region.
    package var hostRegion: UInt32
    package var regionOffset: UInt64
    /// Where the shadow hierarchies' leaves for the range point in the backing memory.
    package var hostOffset: UInt64
    package var description: String { "\(range) <- host region \(hostRegion) +\(hex(regionOffset))" }
}

package struct FlushOptions: Sendable, Equatable {
    package enum Trap: UInt32, Sendable {
        /// Trap exactly when a backing host region needs WPQ flushing (the default).
        case auto = 0
        /// Trap even when no region needs it (to measure the trap path).
        case always = 1
        /// Never trap. On a platform that needs WPQ flushing this loses data at a power failure:
        /// it exists so that the crash-consistency checker can show that it does.
        case never = 2
    }
    package var trap: Trap
    /// Coalesce concurrent guest flushes (per physical flush hint).
    package var coalesce: Bool
    package init(trap: Trap = .auto, coalesce: Bool = true) { self.trap = trap; self.coalesce = coalesce }
}

package struct FlushStatistics: Sendable, Equatable {
    /// Guest writes to the vFHA the core handled (each one exit).
    package var guestFlushes: UInt64 = 0
    /// Exits taken for the vFHA (a failed flush counts here but not in `guestFlushes`).
    package var exits: UInt64 = 0
    /// Physical flush hint writes.
    package var physicalFlushes: UInt64 = 0
    /// (guest flush, flush hint) pairs satisfied by a physical flush another vCPU started.
    package var coalesced: UInt64 = 0
    /// Guest writes to the vFHA that cost no exit (counted by the backend where it can).
    package var untrappedWrites: UInt64 = 0
    /// Time spent handling guest flushes, exit to resume, summed over every flush.
    package var flushNanosTotal: UInt64 = 0
    package init() {}
}

/// A physical flush hint as the VM uses it.
package struct FlushTargetRef: Hashable, Sendable, CustomStringConvertible {
    package var region: UInt32
    package var target: HostPersistence.FlushTarget
    package var description: String { "region \(region) controller \(hex(UInt64(target.controller))) fha \(hex(target.address))" }
}

/// Serializes and coalesces physical flushes of one flush hint. A caller's write was made before it
/// calls `flush`; any physical flush that *starts* after that satisfies it, so a caller that finds a
/// flush in progress waits for the next one (which it, or another waiter, starts).
final class FlushSequencer: @unchecked Sendable {
    private let monitor = Monitor()
    private var started: UInt64 = 0
    private var completed: UInt64 = 0
    private var inProgress = false
    private var waiting = 0
    /// Callers waiting for a flush to complete (for tests).
    var waiters: Int { monitor.lock(); defer { monitor.unlock() }; return waiting }

    /// Returns true if this caller performed a physical flush, false if another's satisfied it.
    func flush(coalesce: Bool, _ body: () throws(NPTError) -> Void) throws(NPTError) -> Bool {
        if !coalesce { try body(); return true }
        monitor.lock()
        let target = started + 1
        var led = false
        while completed < target {
            if inProgress {
                waiting += 1
                monitor.wait(untilNanos: nil)
                waiting -= 1
                continue
            }
            started += 1
            let generation = started
            inProgress = true
            monitor.unlock()
            do throws(NPTError) { try body() } catch {
                monitor.lock()
                inProgress = false
                // Nobody's write is satisfied: a waiter wakes and tries the flush itself.
                monitor.broadcast()
                monitor.unlock()
                throw error
            }
            monitor.lock()
            completed = generation
            inProgress = false
            led = true
            monitor.broadcast()
        }
        monitor.unlock()
        return led
    }
}

/// The persistence configuration and counters of one VM.
final class PersistenceState: Sendable {
    struct Config {
        var host: HostPersistence?
        var ranges: [NVDIMMRange] = []
        var vfha: GPA?
        var trapped = false
        var targets: [FlushTargetRef] = []
        var options = FlushOptions()
        var nextHostChunk: UInt64 = 0
    }
    let config = NPTMutex(Config())
    /// Serializes configuration changes (adding a range, changing options) against each other.
    let configuring = Monitor()
    private let sequencers = NPTMutex<[FlushTargetRef: FlushSequencer]>([:])
    /// The vFHA's page while writes to it trap (UInt64.max: none), read on the exit path.
    let trappedPage = Atomic<UInt64>(.max)
    let guestFlushes = Atomic<UInt64>(0)
    let exits = Atomic<UInt64>(0)
    let physicalFlushes = Atomic<UInt64>(0)
    let coalesced = Atomic<UInt64>(0)
    let flushNanos = Atomic<UInt64>(0)
    /// Per-flush latencies (exit handled to resume), kept only while recording (benchmarks).
    let recording = Atomic<Bool>(false)
    let samples = NPTMutex<[UInt64]>([])

    func sequencer(_ t: FlushTargetRef) -> FlushSequencer {
        sequencers.withLock { m in
            if let s = m[t] { return s }
            let s = FlushSequencer()
            m[t] = s
            return s
        }
    }

    /// A guest write to the vFHA while it traps.
    func isFlushHintWrite(_ x: VMExit) -> Bool {
        let page = trappedPage.load(ordering: .acquiring)
        return page != .max && x.gpa.raw & ~0xFFF == page && x.violation.contains(.write)
    }

    static let maxRanges = 64
}

extension VirtualMachine {
    // MARK: configuration

    /// The host's persistent memory as the backend discovers it (asked once per VM).
    package func hostPersistence() throws(NPTError) -> HostPersistence {
        if let h = persistence.config.withLock({ $0.host }) { return h }
        guard backend.capabilities.contains(.persistentMemory) else {
            throw .unsupported("backend '\(backend.name)' cannot back NVDIMM ranges")
        }
        // The VM's own view first: a simulator VM keeps the platform it was created on.
        let h: HostPersistence
        if let own = backendVM.hostPersistence { h = own } else { h = try backend.hostPersistence() }
        persistence.config.withLock { if $0.host == nil { $0.host = h } }
        return h
    }

    package var nvdimmRanges: [NVDIMMRange] { persistence.config.withLock { $0.ranges } }
    /// The virtual flush hint address (allocated with the first NVDIMM range).
    package var virtualFlushHint: GPA? { persistence.config.withLock { $0.vfha } }
    /// Whether guest writes to the vFHA exit.
    package var flushHintTrapped: Bool { persistence.config.withLock { $0.trapped } }
    /// The physical flush hints a guest flush is propagated to.
    package var flushTargets: [FlushTargetRef] { persistence.config.withLock { $0.targets } }
    package var flushOptions: FlushOptions { persistence.config.withLock { $0.options } }

    /// Adds an NVDIMM range: `size` bytes at guest-physical `gpa`, backed by host region
    /// `hostRegion` from `regionOffset`. Allocates the vFHA with the first range. All or nothing.
    @discardableResult
    package func addNVDIMM(gpa: GPA, size: UInt64, hostRegion: UInt32, regionOffset: UInt64) throws(NPTError) -> NVDIMMRange {
        try withLease { () throws(NPTError) in
            try addNVDIMMLeased(gpa: gpa, size: size, hostRegion: hostRegion, regionOffset: regionOffset)
        }
    }

    private func addNVDIMMLeased(gpa: GPA, size: UInt64, hostRegion: UInt32, regionOffset: UInt64) throws(NPTError) -> NVDIMMRange {
        persistence.configuring.lock()
        defer { persistence.configuring.unlock() }
        let host = try hostPersistence()
        if size == 0 { throw .invalid("size is 0") }
        if gpa.raw % 0x1000 != 0 { throw NPTError(.misaligned, "gpa \(hex(gpa.raw)) is not 4 KiB aligned") }
        if size % 0x1000 != 0 { throw NPTError(.misaligned, "size \(hex(size)) is not a multiple of 4 KiB") }
        if regionOffset % 0x1000 != 0 { throw NPTError(.misaligned, "region_offset \(hex(regionOffset)) is not 4 KiB aligned") }
        let range = GPARange(start: gpa, size: size)
        let (end, o) = gpa.raw.addingReportingOverflow(size)
        if o || end > PolicyTree.maxGuestPhysical - PageSize.size2M.bytes {
            throw NPTError(.outOfRange, "range \(range) is beyond the 48-bit guest-physical space")
        }
        guard let region = host.regions.first(where: { $0.id == hostRegion }) else {
            throw NPTError(.notFound, "host region \(hostRegion) does not exist (host has \(host.regions.map { String($0.id) }.joined(separator: ", ")))")
        }
        let (hostEnd, ho) = regionOffset.addingReportingOverflow(size)
        if ho || hostEnd > region.size {
            throw NPTError(.outOfRange, "region_offset \(hex(regionOffset)) + size \(hex(size)) is past host region \(hostRegion) (\(hex(region.size)) bytes)")
        }
        if let r = self.region, r.range.overlaps(range) {
            throw NPTError(.overlap, "range \(range) overlaps the privileged-mode region \(r.range)")
        }
        let existing = nvdimmRanges
        if existing.count >= PersistenceState.maxRanges { throw NPTError(.outOfRange, "a VM has at most \(PersistenceState.maxRanges) NVDIMM ranges") }
        for e in existing where e.hostRegion == hostRegion
            && GPARange(start: GPA(e.regionOffset), size: e.range.size).overlaps(GPARange(start: GPA(regionOffset), size: size)) {
            throw NPTError(.overlap, "host region \(hostRegion) [\(hex(regionOffset)), \(hex(hostEnd))) is already backing \(e.range)")
        }
        let name = "nvdimm\(existing.count)"
        try reserve(name, range)   // refuses RAM, the region, other NVDIMM ranges and the vFHA

        // Backing: a 1 GiB-aligned chunk of the device window, at the GPA's offset within 1 GiB so
        // that large leaves stay aligned.
        let g = PageSize.size1G.bytes
        let chunk = persistence.config.withLock { $0.nextHostChunk }
        let hostOffset = deviceHostBase + 2 * g + chunk + gpa.raw % g
        let entry = NVDIMMRange(range: range, hostRegion: hostRegion, regionOffset: regionOffset, hostOffset: hostOffset)
        // Every step that can fail without the backend comes before the backend is asked anything,
        // so that a failure leaves the backend as it was where it can (the ABI has no detach: after
        // attachPersistentMemory, a failure leaves an attachment the core never maps, which a
        // retry replaces).
        var vfhaNew: GPA?
        if virtualFlushHint == nil {
            // Above everything the VM has now, on its own 2 MiB block.
            var top = max(config.ramSize, end)
            if let r = self.region { top = max(top, r.range.end) }
            for r in reservedRanges { top = max(top, r.range.end) }
            let page = GPA((top + PageSize.size2M.bytes - 1) & ~(PageSize.size2M.bytes - 1))
            do throws(NPTError) { try reserve("vFHA", GPARange(start: page, size: 0x1000)) } catch {
                unreserve(name)
                throw error
            }
            vfhaNew = page
        }
        // The vFHA's mapping to restore if a later step fails (nil: it had none).
        let previousTrap: Bool? = vfhaNew == nil ? flushHintTrapped : nil
        do throws(NPTError) {
            try backendVM.attachPersistentMemory(range, region: hostRegion, regionOffset: regionOffset, hostOffset: hostOffset)
        } catch {
            unreserve(name)
            if vfhaNew != nil { unreserve("vFHA") }
            throw error
        }
        persistence.config.withLock { c in
            c.ranges.append(entry)
            c.nextHostChunk += (gpa.raw % g + size + g - 1) / g * g
            if let vfhaNew { c.vfha = vfhaNew }
        }
        do throws(NPTError) {
            try remap(newRange: entry, restoring: previousTrap)
        } catch {
            persistence.config.withLock { c in
                c.ranges.removeLast()
                c.nextHostChunk -= (gpa.raw % g + size + g - 1) / g * g
                if vfhaNew != nil { c.vfha = nil }
            }
            unreserve(name)
            if vfhaNew != nil { unreserve("vFHA") }
            throw error
        }
        return entry
    }

    /// Changes the trap and coalescing options; the vFHA's mapping follows at once.
    package func setFlushOptions(_ o: FlushOptions) throws(NPTError) {
        try withLease { () throws(NPTError) in try setFlushOptionsLeased(o) }
    }

    private func setFlushOptionsLeased(_ o: FlushOptions) throws(NPTError) {
        persistence.configuring.lock()
        defer { persistence.configuring.unlock() }
        let old = persistence.config.withLock { c -> FlushOptions in let x = c.options; c.options = o; return x }
        if virtualFlushHint == nil { return }
        do throws(NPTError) { try remap(newRange: nil, restoring: flushHintTrapped) } catch {
            persistence.config.withLock { $0.options = old }
            throw error
        }
    }

    /// Recomputes the trap decision and the flush targets, and maps the vFHA (and a new range).
    /// All or nothing: if the mappings fail, the vFHA's trap state goes back to `restoring` (the
    /// backend's page is defined again that way; nil: it was not defined before) and the flush
    /// targets stay as they were.
    private func remap(newRange: NVDIMMRange?, restoring: Bool?) throws(NPTError) {
        let host = try hostPersistence()
        let (ranges, vfha, options) = persistence.config.withLock { ($0.ranges, $0.vfha, $0.options) }
        guard let vfha else { return }
        let used = Set(ranges.map(\.hostRegion))
        let regions = host.regions.filter { used.contains($0.id) }.sorted { $0.id < $1.id }
        let trapped: Bool
        switch options.trap {
        case .auto: trapped = regions.contains { $0.needsWPQFlush }
        case .always: trapped = true
        case .never: trapped = false
        }
        var targets: [FlushTargetRef] = []
        for r in regions {
            for t in r.flushTargets where !targets.contains(where: { $0.region == r.id && $0.target == t }) {
                targets.append(FlushTargetRef(region: r.id, target: t))
            }
        }
        let scratch = deviceHostBase + PageSize.size1G.bytes
        try backendVM.defineFlushHintPage(vfha, hostOffset: scratch, trapped: trapped)
        var windows: [(range: GPARange, hostOffset: UInt64)] = ranges.map { ($0.range, $0.hostOffset) }
        windows.append((GPARange(start: vfha, size: 0x1000), scratch))
        var changes: [PolicyRange] = []
        if let n = newRange {
            changes.append(PolicyRange(start: n.range.start, size: n.range.size, pageSize: .size4K, permissions: config.defaultPermissions))
        }
        changes.append(PolicyRange(start: vfha, size: 0x1000, pageSize: .size4K, permissions: trapped ? [.read] : [.read, .write]))
        // Publish the trap decision before the mapping that makes writes exit.
        let oldPage = persistence.trappedPage.load(ordering: .acquiring)
        if trapped { persistence.trappedPage.store(vfha.raw, ordering: .releasing) }
        do throws(NPTError) {
            try applyDeviceMappings(changes, windows: windows)
        } catch {
            persistence.trappedPage.store(oldPage, ordering: .releasing)
            if let restoring, restoring != trapped {
                try? backendVM.defineFlushHintPage(vfha, hostOffset: scratch, trapped: restoring)
            }
            throw error
        }
        if !trapped { persistence.trappedPage.store(.max, ordering: .releasing) }
        persistence.config.withLock { c in c.trapped = trapped; c.targets = targets }
    }

    // MARK: the flush path

    /// A guest write to the trapped vFHA: fence the vCPU's earlier stores, write every associated
    /// physical flush hint once (or be satisfied by a concurrent one that started later), then
    /// complete the guest's write.
    func guestFlush(_ v: VirtualCPU) throws(NPTError) {
        let p = persistence
        let t0 = Monitor.now()
        p.exits.wrappingAdd(1, ordering: .relaxed)
        try v.backend.fence()
        let (targets, coalesce) = p.config.withLock { ($0.targets, $0.options.coalesce) }
        for t in targets {
            let led = try p.sequencer(t).flush(coalesce: coalesce) { () throws(NPTError) in
                try backendVM.physicalFlush(region: t.region, target: t.target)
                p.physicalFlushes.wrappingAdd(1, ordering: .relaxed)
            }
            if !led { p.coalesced.wrappingAdd(1, ordering: .relaxed) }
        }
        try v.backend.completeTrappedWrite()
        p.guestFlushes.wrappingAdd(1, ordering: .relaxed)
        let dt = Monitor.now() - t0
        p.flushNanos.wrappingAdd(dt, ordering: .relaxed)
        if p.recording.load(ordering: .relaxed) { p.samples.withLock { $0.append(dt) } }
    }

    /// Starts (or stops) keeping every guest flush's latency, from the exit to the resume.
    package func recordFlushLatencies(_ on: Bool) {
        persistence.recording.store(on, ordering: .relaxed)
        if on { persistence.samples.withLock { $0.removeAll() } }
    }
    /// The latencies kept since recording started, in nanoseconds.
    package func flushLatencies() -> [UInt64] { persistence.samples.withLock { $0 } }

    /// A power failure of the host's persistent memory (where the backend models one): afterwards
    /// the NVDIMM ranges hold what reached the media.
    package func powerFailure() throws(NPTError) {
        if nvdimmRanges.isEmpty { throw NPTError(.state, "the VM has no NVDIMM range") }
        try withLease { () throws(NPTError) in try backendVM.powerFailure() }
    }

    package func flushStatistics() -> FlushStatistics {
        let p = persistence
        var s = FlushStatistics()
        s.guestFlushes = p.guestFlushes.load(ordering: .relaxed)
        s.exits = p.exits.load(ordering: .relaxed)
        s.physicalFlushes = p.physicalFlushes.load(ordering: .relaxed)
        s.coalesced = p.coalesced.load(ordering: .relaxed)
        s.flushNanosTotal = p.flushNanos.load(ordering: .relaxed)
        s.untrappedWrites = (try? withLease { () throws(NPTError) in backendVM.untrappedFlushHintWrites }) ?? 0
        return s
    }

    // MARK: the guest's NVDIMM tables

    /// What the guest is told about its NVDIMMs (`GuestNVDIMM`): virtual DIMM `i` for NVDIMM range
    /// `i` (handle `GuestNVDIMM.handle(ofDIMM:)`), the vFHA as every DIMM's flush hint, and the
    /// persistence domain of the host regions behind the ranges.
    package func guestNVDIMM() throws(NPTError) -> GuestNVDIMM {
        let (ranges, vfha) = persistence.config.withLock { ($0.ranges, $0.vfha) }
        guard let vfha, !ranges.isEmpty else { throw NPTError(.state, "the VM has no NVDIMM range") }
        let host = try hostPersistence()
        let used = Set(ranges.map(\.hostRegion))
        let dimms = ranges.enumerated().map { i, r in
            GuestNVDIMM.DIMM(handle: GuestNVDIMM.handle(ofDIMM: i), base: r.range.start.raw, size: r.range.size)
        }
        return GuestNVDIMM(dimms: dimms, flushHint: vfha.raw,
                           domain: GuestNVDIMM.guestDomain(backedBy: host.regions.filter { used.contains($0.id) }))
    }

    /// The NFIT the guest sees (rules in `GuestNVDIMM`): per NVDIMM range a persistent-memory SPA
    /// range, a memory-device map for one virtual DIMM, its control region and its flush hint
    /// structure naming the vFHA; then the platform capabilities of the host regions behind them.
    package func guestNFIT() throws(NPTError) -> [UInt8] { try guestNVDIMM().nfit().encode() }

    /// The SSDT a VMM adds beside the NFIT: the NVDIMM root device (`_HID` "ACPI0012") in `\_SB`
    /// with one child per virtual DIMM, `_ADR` = its NFIT device handle.
    package func guestNVDIMMSSDT() throws(NPTError) -> [UInt8] { try guestNVDIMM().ssdt() }
}
