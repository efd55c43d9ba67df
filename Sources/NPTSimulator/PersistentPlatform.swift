import NPTCore
import Synchronization

/// The simulated host's persistent memory: memory controllers, each with a write-pending queue
/// (WPQ) and physical flush hint addresses; NVDIMM regions interleaved across controllers; a CPU
/// cache with the semantics of stores, CLWB and SFENCE; and a persistence domain that says whether
/// a power failure drains the WPQs (ADR) or loses them.
///
/// The path of a store to persistent memory:
///   store -> dirty line in the (coherent) cache
///   CLWB  -> the line's current contents leave the cache, in flight from that CPU
///   SFENCE-> that CPU's lines in flight are accepted by their controllers' WPQs
///   flush hint write -> that controller drains its WPQ to the media
/// A full WPQ drains its oldest line. Nothing else moves data to the media, so the model is the
/// pessimistic one: a line reaches the media only when the protocol (or a full queue) puts it there.
package struct PlatformDescription: Sendable, Equatable {
    package struct Controller: Sendable, Equatable {
        /// Controller key (as `NFIT.DeviceHandle.controllerKey`).
        package var id: UInt32
        /// Physical flush hint addresses (a write to any of them drains the WPQ).
        package var flushHints: [UInt64]
        /// WPQ capacity in 64-byte lines.
        package var wpqLines: Int
        package init(id: UInt32, flushHints: [UInt64], wpqLines: Int = 64) {
            self.id = id; self.flushHints = flushHints; self.wpqLines = wpqLines
        }
    }
    package struct Region: Sendable, Equatable {
        package var id: UInt32
        /// System-physical range.
        package var base: UInt64
        package var size: UInt64
        /// Controllers in interleave order.
        package var controllers: [UInt32]
        package var interleaveGranularity: UInt64
        package init(id: UInt32, base: UInt64, size: UInt64, controllers: [UInt32], interleaveGranularity: UInt64 = 4096) {
            self.id = id; self.base = base; self.size = size; self.controllers = controllers
            self.interleaveGranularity = interleaveGranularity
        }
    }
    package enum PersistenceDomain: String, Sendable, Equatable {
        /// ADR: a power failure drains every WPQ to the media; no WPQ flushing is needed.
        case memoryController = "memory_controller"
        /// A power failure loses the WPQs: data is durable only once a flush hint drained it.
        case media = "media"
    }
    package var controllers: [Controller]
    package var regions: [Region]
    package var domain: PersistenceDomain
    /// Time a flush hint write takes (the controller's drain), spent by the writing CPU.
    package var flushLatencyNanos: UInt64

    package init(controllers: [Controller], regions: [Region], domain: PersistenceDomain, flushLatencyNanos: UInt64 = 0) {
        self.controllers = controllers; self.regions = regions; self.domain = domain
        self.flushLatencyNanos = flushLatencyNanos
    }

    /// Three controllers; region 0 (1 GiB) interleaved across controllers 0x000 and 0x100 of
    /// socket 0, region 1 (512 MiB) on controller 0x1000 (socket 1). Flush hints as a BIOS would
    /// describe them: one page per controller.
    package static func standard(needsWPQFlush: Bool, flushLatencyNanos: UInt64 = 0) -> PlatformDescription {
        PlatformDescription(
            controllers: [Controller(id: 0x000, flushHints: [0xF000_0000, 0xF000_0040]),
                          Controller(id: 0x100, flushHints: [0xF000_1000]),
                          Controller(id: 0x1000, flushHints: [0xF000_2000])],
            regions: [Region(id: 1, base: 0x10_0000_0000, size: 1 << 30, controllers: [0x000, 0x100]),
                      Region(id: 2, base: 0x20_0000_0000, size: 512 << 20, controllers: [0x1000])],
            domain: needsWPQFlush ? .media : .memoryController, flushLatencyNanos: flushLatencyNanos)
    }

    /// The platform an NFIT describes: a region per persistent-memory SPA range, interleaved over
    /// the controllers of the DIMMs mapped into it (in memory-map order), each controller with the
    /// flush hints of its DIMMs. The NFIT's platform capabilities give the persistence domain.
    package static func from(nfit: NFIT, flushLatencyNanos: UInt64 = 0) throws(NPTError) -> PlatformDescription {
        let host = try HostPersistence.checkedFromNFIT(nfit)
        if host.regions.isEmpty { throw .invalid("the NFIT describes no persistent-memory range") }
        var controllers: [Controller] = []
        var regions: [Region] = []
        for r in host.regions {
            var order: [UInt32] = []
            for m in nfit.memoryMaps where m.spaRangeIndex == UInt16(truncatingIfNeeded: r.id) {
                let key = m.handle.controllerKey
                if !order.contains(key) { order.append(key) }
            }
            if order.isEmpty { order = r.controllers }
            if order.isEmpty { throw .invalid("NFIT SPA range \(r.id) has no memory device mapped into it") }
            regions.append(Region(id: r.id, base: r.base, size: r.size, controllers: order))
            for c in order where !controllers.contains(where: { $0.id == c }) {
                var hints: [UInt64] = []
                for f in nfit.flushHints where f.handle.controllerKey == c {
                    for a in f.addresses where !hints.contains(a) { hints.append(a) }
                }
                controllers.append(Controller(id: c, flushHints: hints))
            }
        }
        return PlatformDescription(controllers: controllers, regions: regions,
                                   domain: host.needsWPQFlush ? .media : .memoryController,
                                   flushLatencyNanos: flushLatencyNanos)
    }

    /// What host discovery sees on this platform.
    package var persistence: HostPersistence {
        HostPersistence(regions: regions.map { r in
            let targets = r.controllers.sorted().compactMap { c -> HostPersistence.FlushTarget? in
                guard let ctl = controllers.first(where: { $0.id == c }), let a = ctl.flushHints.first else { return nil }
                return HostPersistence.FlushTarget(controller: c, address: a)
            }
            return HostPersistence.Region(id: r.id, base: r.base, size: r.size, controllers: r.controllers.sorted(),
                                          flushTargets: targets, needsWPQFlush: domain == .media && !targets.isEmpty,
                                          domain: domain == .media ? .media : .memoryController)
        }, source: "simulator")
    }

    func validate() throws(NPTError) {
        if regions.isEmpty { throw .invalid("the platform has no persistent-memory region") }
        try HostPersistence.checkRanges(regions.map { ($0.id, $0.base, $0.size) }, source: "platform")
        for r in regions {
            if r.size == 0 || r.size % 4096 != 0 { throw .invalid("region \(r.id): size \(hex(r.size)) is not a positive multiple of 4 KiB") }
            if r.controllers.isEmpty { throw .invalid("region \(r.id) has no controller") }
            if r.interleaveGranularity < 64 || r.interleaveGranularity & (r.interleaveGranularity - 1) != 0 {
                throw .invalid("region \(r.id): interleave granularity \(r.interleaveGranularity) is not a power of two >= 64")
            }
            for c in r.controllers where !controllers.contains(where: { $0.id == c }) {
                throw .invalid("region \(r.id) names controller \(hex(UInt64(c))), which the platform does not have")
            }
        }
        for c in controllers where c.wpqLines < 1 { throw .invalid("controller \(hex(UInt64(c.id))): WPQ of \(c.wpqLines) lines") }
    }
}

/// One event of the persistence protocol, as a vCPU executed it (for the crash-consistency checker).
package enum PersistenceEvent: Sendable, Equatable {
    /// An 8-byte store to system-physical `spa`.
    case store(spa: UInt64, value: UInt64)
    /// CLWB of the line holding `spa`.
    case writeBack(spa: UInt64)
    case fence
    /// A write to the vFHA retired (trapped and handled, or untrapped).
    case flushHintWrite
    /// A physical flush hint of `controller` was written: its WPQ drained.
    case physicalFlush(controller: UInt32)
}

/// The runtime state of a simulated platform: shared by every VM of one simulator backend.
package final class PersistentPlatform: @unchecked Sendable {
    package let description: PlatformDescription
    static let line: UInt64 = 64

    private struct Queued { var spa: UInt64; var bytes: [UInt8] }
    /// Where a dirty line's current contents are (the VM's backing memory, which outlives the entry).
    private struct LinePointer: @unchecked Sendable { var p: UnsafeMutableRawPointer }
    private struct State {
        /// Dirty lines: line address -> where its current contents are (the VM's backing memory).
        var dirty: [UInt64: LinePointer] = [:]
        /// Written back by a CPU, not yet accepted by a controller (the CPU's SFENCE waits for them).
        var inFlight: [ObjectIdentifier: [Queued]] = [:]
        var wpq: [UInt32: [Queued]] = [:]
        var media: [UInt64: [UInt8]] = [:]
        var physicalFlushes: UInt64 = 0
        var wpqOverflows: UInt64 = 0
        var powerFailures: UInt64 = 0
    }
    private let state = NPTMutex(State())
    private let observer = NPTMutex<(@Sendable (ObjectIdentifier?, PersistenceEvent) -> Void)?>(nil)
    /// VMs backed by this platform (to reload their persistent memory after a power failure).
    private let attached = NPTMutex<[ObjectIdentifier: @Sendable () -> Void]>([:])

    package init(_ d: PlatformDescription) throws(NPTError) {
        try d.validate()
        description = d
    }

    // MARK: geometry

    func region(_ id: UInt32) -> PlatformDescription.Region? { description.regions.first { $0.id == id } }

    /// The controller a system-physical address is interleaved to.
    package func controller(of spa: UInt64) -> UInt32? {
        guard let r = description.regions.first(where: { spa >= $0.base && spa < $0.base + $0.size }) else { return nil }
        let way = ((spa - r.base) / r.interleaveGranularity) % UInt64(r.controllers.count)
        return r.controllers[Int(way)]
    }

    // MARK: the CPU side

    /// Sets a callback that sees every protocol event (tests, the crash checker); nil removes it.
    package func observe(_ f: (@Sendable (ObjectIdentifier?, PersistenceEvent) -> Void)?) { observer.withLock { $0 = f } }
    func emit(_ cpu: ObjectIdentifier?, _ e: PersistenceEvent) {
        if let f = observer.withLock({ $0 }) { f(cpu, e) }
    }

    /// A store to `spa`; `lineBase` is where the line's current contents are.
    func store(cpu: ObjectIdentifier, spa: UInt64, value: UInt64, lineBase: UnsafeMutableRawPointer) {
        let lp = LinePointer(p: lineBase)
        state.withLock { $0.dirty[spa & ~(PersistentPlatform.line - 1)] = lp }
        emit(cpu, .store(spa: spa, value: value))
    }

    /// CLWB: the line's contents leave the cache (if dirty) and are in flight from `cpu`.
    func writeBack(cpu: ObjectIdentifier, spa: UInt64) {
        let l = spa & ~(PersistentPlatform.line - 1)
        state.withLock { s in
            guard let p = s.dirty.removeValue(forKey: l) else { return }
            let bytes = [UInt8](UnsafeRawBufferPointer(start: p.p, count: Int(PersistentPlatform.line)))
            s.inFlight[cpu, default: []].append(Queued(spa: l, bytes: bytes))
        }
        emit(cpu, .writeBack(spa: spa))
    }

    /// SFENCE: every line in flight from `cpu` is accepted by its controller's WPQ.
    func fence(cpu: ObjectIdentifier) {
        state.withLock { s in
            guard let lines = s.inFlight.removeValue(forKey: cpu) else { return }
            for q in lines {
                guard let c = controller(of: q.spa) else { continue }
                s.wpq[c, default: []].append(q)
                let cap = description.controllers.first { $0.id == c }?.wpqLines ?? 64
                if s.wpq[c]!.count > cap {
                    let oldest = s.wpq[c]!.removeFirst()
                    s.media[oldest.spa] = oldest.bytes
                    s.wpqOverflows += 1
                }
            }
        }
        emit(cpu, .fence)
    }

    func flushHintWritten(cpu: ObjectIdentifier) { emit(cpu, .flushHintWrite) }

    // MARK: the controller side

    /// A write to physical flush hint `address` of controller `controller`: its WPQ drains to the media.
    package func physicalFlush(controller: UInt32, address: UInt64) throws(NPTError) {
        guard let c = description.controllers.first(where: { $0.id == controller }) else {
            throw NPTError(.notFound, "controller \(hex(UInt64(controller))) does not exist")
        }
        guard c.flushHints.contains(address) else {
            throw NPTError(.invalidArgument, "\(hex(address)) is not a flush hint of controller \(hex(UInt64(controller)))")
        }
        state.withLock { s in
            for q in s.wpq.removeValue(forKey: controller) ?? [] { s.media[q.spa] = q.bytes }
            s.physicalFlushes += 1
        }
        if description.flushLatencyNanos > 0 { PersistentPlatform.spin(description.flushLatencyNanos) }
        emit(nil, .physicalFlush(controller: controller))
    }

    static func spin(_ ns: UInt64) {
        let end = Monitor.now() + ns
        while Monitor.now() < end {}
    }

    package var physicalFlushes: UInt64 { state.withLock { $0.physicalFlushes } }
    /// Lines waiting in every WPQ.
    package var queuedLines: Int { state.withLock { $0.wpq.values.reduce(0) { $0 + $1.count } } }

    // MARK: power

    /// What the media would hold after a power failure now (nothing changes): the media, plus every
    /// WPQ when the persistence domain drains them. Sparse: line address -> 64 bytes.
    package func survivingMedia() -> [UInt64: [UInt8]] {
        state.withLock { s in
            var m = s.media
            if description.domain == .memoryController {
                for q in s.wpq.values.joined() { m[q.spa] = q.bytes }
            }
            return m
        }
    }

    /// The 8 bytes at `spa` in `media` (0 where nothing reached it).
    package static func read64(_ media: [UInt64: [UInt8]], _ spa: UInt64) -> UInt64 {
        guard let l = media[spa & ~(line - 1)] else { return 0 }
        let o = Int(spa & (line - 1))
        var v: UInt64 = 0
        for i in 0..<8 where o + i < 64 { v |= UInt64(l[o + i]) << (8 * UInt64(i)) }
        return v
    }

    /// A power failure: caches and lines in flight are lost, the WPQs drain (ADR) or are lost, and
    /// every VM's persistent memory then holds what the media holds.
    package func powerFailure() {
        let media = survivingMedia()
        state.withLock { s in
            s.media = media
            s.dirty.removeAll(); s.inFlight.removeAll(); s.wpq.removeAll()
            s.powerFailures += 1
        }
        for reload in attached.withLock({ Array($0.values) }) { reload() }
    }

    /// Copies the media of `[spa, spa+len)` into `dst` (zeros where nothing reached the media).
    func loadMedia(spa: UInt64, len: UInt64, into dst: UnsafeMutableRawPointer) {
        state.withLock { s in
            dst.initializeMemory(as: UInt8.self, repeating: 0, count: Int(len))
            for (l, bytes) in s.media where l >= spa && l < spa + len {
                bytes.withUnsafeBytes { (dst + Int(l - spa)).copyMemory(from: $0.baseAddress!, byteCount: 64) }
            }
        }
    }

    /// Host ranges backing some VM (a range backs at most one VM range).
    private let claims = NPTMutex<[(owner: ObjectIdentifier, region: UInt32, start: UInt64, end: UInt64)]>([])

    func claim(_ owner: ObjectIdentifier, region: UInt32, offset: UInt64, size: UInt64) throws(NPTError) {
        let clash = claims.withLock { c -> Bool in
            if c.contains(where: { $0.region == region && $0.start < offset + size && offset < $0.end }) { return true }
            c.append((owner, region, offset, offset + size))
            return false
        }
        if clash { throw NPTError(.overlap, "host region \(region) [\(hex(offset)), \(hex(offset + size))) already backs another NVDIMM range") }
    }

    /// Drops `owner`'s claim that starts at `offset` of `region` (an attachment the core forgot after
    /// a later step of adding the range failed).
    func unclaim(_ owner: ObjectIdentifier, region: UInt32, offset: UInt64) {
        claims.withLock { c in c.removeAll { $0.owner == owner && $0.region == region && $0.start == offset } }
    }

    func attach(_ id: ObjectIdentifier, reload: @escaping @Sendable () -> Void) { attached.withLock { $0[id] = reload } }
    func detach(_ id: ObjectIdentifier) {
        _ = attached.withLock { $0.removeValue(forKey: id) }
        let mine = claims.withLock { c -> [(region: UInt32, start: UInt64, end: UInt64)] in
            let m = c.filter { $0.owner == id }.map { ($0.region, $0.start, $0.end) }
            c.removeAll { $0.owner == id }
            return m
        }
        // Its dirty lines point into its backing memory, which is going away: the cache loses them.
        state.withLock { s in
            for m in mine {
                guard let r = region(m.region) else { continue }
                let lo = r.base + m.start, hi = r.base + m.end
                s.dirty = s.dirty.filter { $0.key < lo || $0.key >= hi }
            }
        }
    }
    package var attachedVMs: Int { attached.withLock { $0.count } }
}
