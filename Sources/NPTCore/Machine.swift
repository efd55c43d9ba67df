import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Publishes the current shadow hierarchies to backends.
final class ShadowPublisher: HierarchyProvider {
    let box: NPTMutex<ShadowSnapshot>
    private let generation: Atomic<UInt64>
    init(_ s: ShadowSnapshot) { box = NPTMutex(s); generation = Atomic(s.generation) }
    func currentSnapshot() -> ShadowSnapshot { box.withLock { $0 } }
    var publishedGeneration: UInt64 { generation.load(ordering: .acquiring) }
    func publish(_ s: ShadowSnapshot) {
        box.withLock { $0 = s }
        generation.store(s.generation, ordering: .releasing)
    }
}

/// Counters of one VM (all vCPUs together).
package final class VMCounters: Sendable {
    package let exitsTotal = Atomic<UInt64>(0)
    package let exitsEscalation = Atomic<UInt64>(0)
    package let exitsReturnToUser = Atomic<UInt64>(0)
    package let exitsEPTViolation = Atomic<UInt64>(0)
    package let hierarchySwitches = Atomic<UInt64>(0)
    package let violationsReported = Atomic<UInt64>(0)
    package let policyUpdates = Atomic<UInt64>(0)
    package let invalidations = Atomic<UInt64>(0)
    init() {}
    func bump(_ a: borrowing Atomic<UInt64>) { a.wrappingAdd(1, ordering: .relaxed) }
}

package struct VMStatistics: Sendable, Equatable {
    package var exitsTotal: UInt64 = 0
    package var exitsEscalation: UInt64 = 0
    package var exitsReturnToUser: UInt64 = 0
    package var exitsEPTViolation: UInt64 = 0
    package var hierarchySwitches: UInt64 = 0
    package var violationsReported: UInt64 = 0
    package var policyUpdates: UInt64 = 0
    package var invalidations: UInt64 = 0
    package var instructions: UInt64 = 0
    package var tlbHits: UInt64 = 0
    package var tlbMisses: UInt64 = 0
    package var shadowNodes: UInt64 = 0
    package var shadowNodesSingle: UInt64 = 0
    package init() {}
}

/// A VM as the core sees it: the policy, the hierarchies derived from it, and the backend's VM.
package final class VirtualMachine: Sendable {
    package let config: VMConfig
    package let backend: any Backend
    package let backendVM: any BackendVM
    package let counters = VMCounters()
    let publisher: ShadowPublisher

    private struct PolicyState: ~Copyable {
        var tree: PolicyTree
        var builder: ShadowBuilder
        var generation: UInt64
        /// Bumped by every policy change; the region's two views are cached per version.
        var version: UInt64 = 0
        var regionMapped = false
        var regionViews: (version: UInt64, unmapped: (PolicyTree, [ShadowNode]), mapped: (PolicyTree, [ShadowNode]))?
    }
    private let policy: NPTMutex<PolicyState>
    /// The policy as last published, for readers: never held while a backend is called, so a
    /// backend operation may read the policy (npt_policy_get from `invalidate`).
    private let publishedTree: NPTMutex<PolicyTree>
    private struct VCPUTable {
        var map: [UInt32: VirtualCPU] = [:]
        /// Indices being created (the backend is building them).
        var creating: Set<UInt32> = []
    }
    private let vcpus = NPTMutex(VCPUTable())
    /// Calls that reach the backend hold a lease; `destroy` waits for them (Lifetime).
    let life = Lifetime("the VM")
    /// How long `destroy` waits for calls on other threads to return.
    package static let destroyWaitNanos: UInt64 = 5_000_000_000
    /// vCPUs a VM may have at once (each is a slot of the privileged-mode protocol; indices are
    /// any UInt32). More are refused with `.outOfRange`.
    package static let maxVCPUs = 1024
    private let regionBox = NPTMutex<PrivilegedRegion?>(nil)
    private let reserved = NPTMutex<[(name: String, range: GPARange)]>([])
    private let privilegedError = NPTMutex<String>("")
    /// The privileged-mode (SMM-like) coordinator of this VM.
    package let privileged: PrivilegedModeCoordinator

    /// Which exits the policy makes necessary (`needsUserOnly`, `needsSupervisorOnly`): bits are
    /// added before a policy that needs them is published (after every vCPU armed its exits) and
    /// dropped after a policy that no longer needs them is.
    let exitNeeds = Atomic<UInt8>(0)
    /// Raised when exitNeeds gains a bit: vCPUs re-arm their exits before their next run.
    let armEpoch = Atomic<UInt64>(0)
    static let needsUserOnly: UInt8 = 1
    static let needsSupervisorOnly: UInt8 = 2
    /// How long a policy update waits for running vCPUs to re-arm their exits.
    package let armTimeoutNanos: UInt64 = 2_000_000_000

    static func exitNeeds(of mask: UInt16) -> UInt8 {
        (mask & CodeMask.userOnly != 0 ? needsUserOnly : 0) | (mask & CodeMask.supervisorOnly != 0 ? needsSupervisorOnly : 0)
    }
    /// NVDIMM ranges, the virtual flush hint and its flush sequencers (Persistence.swift).
    let persistence = PersistenceState()

    package init(config: VMConfig, registry: BackendRegistry, handle: UnsafeMutableRawPointer? = nil) throws(NPTError) {
        guard config.ramSize > 0 else { throw .invalid("ram_size is 0") }
        guard config.ramSize % PageSize.size4K.bytes == 0 else {
            throw NPTError(.misaligned, "ram_size \(hex(config.ramSize)) is not a multiple of 4 KiB")
        }
        guard config.ramSize <= PolicyTree.maxGuestPhysical else {
            throw NPTError(.outOfRange, "ram_size \(hex(config.ramSize)) exceeds the 48-bit guest-physical space")
        }
        guard config.defaultPermissions.isValidPolicy else {
            throw .invalid("default_perms \(hex(config.defaultPermissions.rawValue)): only bits 0, 1, 2 and 10, and write needs read")
        }
        let backend = try registry.lookup(config.backendName)
        guard backend.capabilities.contains(.mbecEmulation) else {
            throw .unsupported("backend '\(backend.name)' cannot expose shadow hierarchies (no MBEC emulation)")
        }
        // A guarantee is earned: a mode the backend cannot keep is refused, naming what is missing.
        if let refusal = config.mbecMode.refusal(backend: backend.name, capabilities: backend.capabilities, summary: backend.summary) { throw refusal }
        let tree = PolicyTree(ramSize: config.ramSize, defaultPermissions: config.defaultPermissions)
        var builder = ShadowBuilder()
        let snap = builder.snapshot(of: tree, generation: 0)
        let publisher = ShadowPublisher(snap)
        self.config = config
        self.backend = backend
        self.publisher = publisher
        self.policy = NPTMutex(PolicyState(tree: tree, builder: builder, generation: 0))
        self.publishedTree = NPTMutex(tree)
        self.exitNeeds.store(VirtualMachine.exitNeeds(of: tree.root.mask), ordering: .relaxed)
        let made = try backend.makeVM(config: config, hierarchies: publisher, handle: handle)
        // The recording layer (Recording.swift) sits between the core and any backend.
        if let r = config.recorder {
            do throws(NPTError) { self.backendVM = try r.wrap(made, backend: backend, config: config) } catch {
                made.destroy()
                throw error
            }
        } else {
            self.backendVM = made
        }
        privileged = PrivilegedModeCoordinator(backend: backendVM)
    }

    /// The instruction set the VM's vCPUs execute (its backend's).
    package var guestISA: GuestISA { backend.guestISA }

    /// Before a policy that has user-execute-only (or supervisor-execute-only) pages where the
    /// current one has none is published, every vCPU must have armed the exit that keeps the
    /// guarantee with such pages: raise the arming epoch, kick the vCPUs inside `backend.run`, and
    /// wait until each has left it (it re-arms before it runs again).
    private func armExits(for ranges: [PolicyRange]) throws(NPTError) {
        var add: UInt8 = 0
        for r in ranges { add |= VirtualMachine.exitNeeds(of: 1 << UInt16(r.permissions.code)) }
        let old = exitNeeds.load(ordering: .acquiring)
        guard add & ~old != 0 else { return }
        exitNeeds.bitwiseOr(add, ordering: .sequentiallyConsistent)
        let epoch = armEpoch.wrappingAdd(1, ordering: .sequentiallyConsistent).newValue
        let deadline = Monitor.now() &+ armTimeoutNanos
        var kicked = Set<UInt32>()
        while true {
            let stale = allVCPUs.filter { v in
                let e = v.inRunEpoch.load(ordering: .sequentiallyConsistent)
                return e != 0 && e &- 1 != epoch
            }
            if stale.isEmpty { return }
            for v in stale where kicked.insert(v.index).inserted { v.kick() }
            if Monitor.now() >= deadline {
                throw NPTError(.busy, "vCPU \(stale[0].index) did not leave its run to arm the exits the new policy needs within \(armTimeoutNanos / 1_000_000) ms; policy unchanged")
            }
            sched_yield()
        }
    }

    package var snapshot: ShadowSnapshot { publisher.currentSnapshot() }

    // MARK: policy

    package func permissions(at gpa: GPA) throws(NPTError) -> EPTPermissions {
        guard gpa.raw < config.ramSize || nvdimmRanges.contains(where: { $0.range.contains(gpa) }) else {
            throw NPTError(.outOfRange, "gpa \(hex(gpa.raw)) is outside guest RAM (\(hex(config.ramSize))) and the NVDIMM ranges")
        }
        return publishedTree.withLock { $0.permissions(at: gpa) }
    }

    /// The policy of any guest-physical page (none outside RAM and the visible region); never throws,
    /// for the exit path.
    func policyPermissions(at gpa: GPA) -> EPTPermissions {
        guard gpa.raw < PolicyTree.maxGuestPhysical else { return .none }
        return publishedTree.withLock { $0.permissions(at: gpa) }
    }

    package func policyRuns() -> [(GPARange, EPTPermissions)] { publishedTree.withLock { $0 }.runs() }

    /// The policy lock is held: readers see `tree` from now on.
    private func publishTree(_ tree: PolicyTree) { publishedTree.withLock { $0 = tree } }

    /// Runs `body` holding a lease on the VM: refused once it is destroyed (`.badHandle`) or while
    /// another thread destroys it (`.busy`); `destroy` waits for it.
    package func withLease<T>(_ body: () throws(NPTError) -> T) throws(NPTError) -> T { try life.withLease(body) }

    /// Whether the VM has been destroyed.
    package var isDestroyed: Bool { life.current == .closed }

    /// Applies `ranges` atomically: every range is checked first, and if the backend refuses an
    /// invalidation the previous policy is restored.
    @discardableResult
    package func setPolicy(_ ranges: [PolicyRange]) throws(NPTError) -> [Invalidation] {
        if ranges.isEmpty { throw .invalid("count is 0") }
        return try life.withLease { () throws(NPTError) in try setPolicyLeased(ranges) }
    }

    private func setPolicyLeased(_ ranges: [PolicyRange]) throws(NPTError) -> [Invalidation] {
        let sorted = ranges.sorted { $0.range.start < $1.range.start }
        for (i, r) in sorted.enumerated() where i > 0 && sorted[i - 1].range.overlaps(r.range) {
            throw NPTError(.overlap, "ranges \(sorted[i - 1].range) and \(r.range) overlap")
        }
        let invs = try apply(ranges, windows: nil, validate: true, what: "policy")
        counters.policyUpdates.wrappingAdd(UInt64(ranges.count), ordering: .relaxed)
        return invs
    }

    @discardableResult
    package func setPolicy(_ r: PolicyRange) throws(NPTError) -> [Invalidation] { try setPolicy([r]) }

    /// A caller's policy range: the rules of the ABI (alignment, permissions), inside guest RAM or
    /// inside one NVDIMM range (which carry policies like RAM).
    private func validatePolicy(_ r: PolicyRange, tree: PolicyTree) throws(NPTError) {
        let end = r.range.start.raw.addingReportingOverflow(r.range.size)
        if !end.overflow, r.range.size > 0, let n = nvdimmRanges.first(where: { $0.range.overlaps(r.range) }) {
            guard r.range.start.raw >= n.range.start.raw && end.partialValue <= n.range.end else {
                throw NPTError(.outOfRange, "range \(r.range) is not inside one NVDIMM range (it overlaps \(n.range))")
            }
            try tree.validate(r, bound: .max)   // alignment and permissions; the range checked above
            return
        }
        try tree.validate(r)
    }

    /// Applies mappings the core owns outside RAM (NVDIMM ranges, the vFHA page) and the backing
    /// windows they use, then tells the backend which translations lost a permission. All or
    /// nothing, as `setPolicy`: if the backend refuses an invalidation, the previous policy, windows
    /// and hierarchies are restored.
    func applyDeviceMappings(_ ranges: [PolicyRange], windows: [(range: GPARange, hostOffset: UInt64)]) throws(NPTError) {
        try apply(ranges, windows: windows, validate: false, what: "mappings")
    }

    /// Applies `ranges` to the policy (and `windows` to the backing, when given) under the policy
    /// lock, publishes the new hierarchies and sends the invalidations; if the backend refuses one,
    /// restores the previous policy, windows and hierarchies. `validate`: check each range against
    /// the rules of a caller's policy (RAM bounds, alignment) first.
    @discardableResult
    private func apply(_ ranges: [PolicyRange], windows: [(range: GPARange, hostOffset: UInt64)]?, validate: Bool,
                       what: String) throws(NPTError) -> [Invalidation] {
        if validate {
            let tree = policy.withLock { $0.tree }
            for r in ranges { try validatePolicy(r, tree: tree) }
        }
        try armExits(for: ranges)
        let result: Result<[Invalidation], NPTError> = policy.withLock { (s: inout PolicyState) in
            let oldTree = s.tree
            let oldWindows = s.builder.extraWindows
            let oldSnapshot = publisher.currentSnapshot()
            var invs: [Invalidation] = []
            if let windows { s.builder.extraWindows = windows }
            for r in ranges {
                let old = s.tree.apply(r)
                invs += Invalidation.needed(range: r.range, oldMask: old, new: r.permissions)
            }
            s.generation += 1
            s.version += 1
            publisher.publish(s.builder.snapshot(of: s.tree, generation: s.generation))
            publishTree(s.tree)
            do throws(NPTError) {
                for inv in invs { try backendVM.invalidate(inv) }
            } catch {
                s.tree = oldTree
                if windows != nil { s.builder.extraWindows = oldWindows }
                s.version += 1
                publisher.publish(oldSnapshot)
                publishTree(oldTree)
                for inv in invs { try? backendVM.invalidate(inv) }
                return .failure(NPTError(.backend, "backend '\(backend.name)' failed to invalidate: \(error.message); \(what) unchanged"))
            }
            // Exits the policy no longer needs are dropped by each vCPU at its next switch.
            exitNeeds.store(VirtualMachine.exitNeeds(of: s.tree.root.mask), ordering: .releasing)
            return .success(invs)
        }
        let invs = try result.get()
        counters.invalidations.wrappingAdd(UInt64(invs.count), ordering: .relaxed)
        return invs
    }

    /// The first 1 GiB boundary at or past RAM: the privileged-mode region's backing starts there,
    /// the NVDIMM windows 1 GiB later.
    var deviceHostBase: UInt64 { (config.ramSize + PageSize.size1G.bytes - 1) / PageSize.size1G.bytes * PageSize.size1G.bytes }

    // MARK: reserved guest-physical ranges

    /// Reserves a guest-physical range for a device of the VM (the virtual flush hint address, ...):
    /// it may not overlap RAM, the privileged-mode region or another reservation.
    package func reserve(_ name: String, _ range: GPARange) throws(NPTError) {
        if range.size == 0 { throw .invalid("\(name): size is 0") }
        if range.overlaps(GPARange(start: GPA(0), size: config.ramSize)) {
            throw NPTError(.overlap, "\(name) \(range) overlaps guest RAM [0x0, \(hex(config.ramSize)))")
        }
        if let r = region, r.range.overlaps(range) {
            throw NPTError(.overlap, "\(name) \(range) overlaps the privileged-mode region \(r.range)")
        }
        let clash: String? = reserved.withLock { list in
            if let o = list.first(where: { $0.range.overlaps(range) }) { return "\(name) \(range) overlaps \(o.name) \(o.range)" }
            list.append((name, range))
            return nil
        }
        if let clash { throw NPTError(.overlap, clash) }
    }

    package var reservedRanges: [(name: String, range: GPARange)] { reserved.withLock { $0 } }

    /// Drops a reservation (to undo a failed configuration step).
    func unreserve(_ name: String) { reserved.withLock { $0.removeAll { $0.name == name } } }

    // MARK: privileged-mode region

    package var region: PrivilegedRegion? { regionBox.withLock { $0 } }
    func setLastPrivilegedError(_ m: String) { privilegedError.withLock { $0 = m } }
    /// Why the last enter-mode request failed.
    package var lastPrivilegedError: String { privilegedError.withLock { $0 } }

    /// Describes the special region: where it is (outside RAM), its contents and its entry point.
    /// Its pages are in no hierarchy until a CPU enters the mode.
    package func defineRegion(start: GPA, size: UInt64, contents: [UInt8], entryOffset: UInt64 = 0,
                             permissions: EPTPermissions = .all) throws(NPTError) {
        guard backend.capabilities.contains(.privilegedMode) else {
            throw .unsupported("backend '\(backend.name)' cannot stop vCPUs or back a privileged-mode region")
        }
        if size == 0 { throw .invalid("size is 0") }
        if start.raw % 0x1000 != 0 { throw NPTError(.misaligned, "gpa \(hex(start.raw)) is not 4 KiB aligned") }
        if size % 0x1000 != 0 { throw NPTError(.misaligned, "size \(hex(size)) is not a multiple of 4 KiB") }
        if size > PageSize.size1G.bytes { throw NPTError(.outOfRange, "size \(hex(size)) is larger than 1 GiB") }
        let range = GPARange(start: start, size: size)
        let (end, o) = start.raw.addingReportingOverflow(size)
        if o || end > PolicyTree.maxGuestPhysical { throw NPTError(.outOfRange, "range \(range) is beyond 48 bits") }
        if range.overlaps(GPARange(start: GPA(0), size: config.ramSize)) {
            throw NPTError(.overlap, "range \(range) overlaps guest RAM [0x0, \(hex(config.ramSize)))")
        }
        if let o = reservedRanges.first(where: { $0.range.overlaps(range) }) {
            throw NPTError(.overlap, "range \(range) overlaps \(o.name) \(o.range)")
        }
        if UInt64(contents.count) > size { throw .invalid("contents (\(contents.count) bytes) are larger than the region") }
        if entryOffset >= size || entryOffset % 8 != 0 {
            throw .invalid("entry_offset \(hex(entryOffset)) is not an 8-byte aligned offset inside the region")
        }
        guard permissions.isValidPolicy, permissions != .none else { throw .invalid("perms \(hex(permissions.rawValue)) are not a valid policy") }
        if privileged.holder != nil { throw NPTError(.busy, "a vCPU is in the privileged mode; the region cannot change now") }
        try life.withLease { () throws(NPTError) in
            try defineRegionLeased(range, contents: contents, entryOffset: entryOffset, permissions: permissions)
        }
    }

    private func defineRegionLeased(_ range: GPARange, contents: [UInt8], entryOffset: UInt64,
                                    permissions: EPTPermissions) throws(NPTError) {
        let host = deviceHostBase
        var failure: NPTError?
        contents.withUnsafeBytes { b in
            do throws(NPTError) { try backendVM.defineRegion(range, hostOffset: host, contents: b) } catch { failure = error }
        }
        if let failure { throw failure }
        let old = region
        policy.withLock { s in
            // Forget the old region's pages (they are unmapped: no CPU is in the mode).
            if let old { _ = s.tree.apply(PolicyRange(start: old.range.start, size: old.range.size, pageSize: .size4K, permissions: .none)) }
            s.builder.region = (range, host)
            s.version += 1
            publishTree(s.tree)
        }
        regionBox.withLock { $0 = PrivilegedRegion(range: range, permissions: permissions, entryOffset: entryOffset, hostOffset: host) }
        privileged.activate()
    }

    /// Adds the region to (or removes it from) every hierarchy, and invalidates its translations.
    func setRegionMapped(_ mapped: Bool) throws(NPTError) {
        guard let r = region else { throw NPTError(.state, "no privileged-mode region is defined") }
        let pr = PolicyRange(start: r.range.start, size: r.range.size, pageSize: .size4K, permissions: mapped ? r.permissions : .none)
        let invs: [Invalidation] = policy.withLock { s in
            // The two views differ only in the region; build both once per policy version, then
            // switching is a pointer swap (an SMM storm does not rebuild tables on every entry).
            if s.regionViews?.version != s.version {
                var unmapped = s.tree, mapped = s.tree
                unmapped.apply(PolicyRange(start: r.range.start, size: r.range.size, pageSize: .size4K, permissions: .none))
                mapped.apply(PolicyRange(start: r.range.start, size: r.range.size, pageSize: .size4K, permissions: r.permissions))
                let u = s.builder.snapshot(of: unmapped, generation: 0).roots
                let m = s.builder.snapshot(of: mapped, generation: 0).roots
                s.regionViews = (s.version, (unmapped, u), (mapped, m))
            }
            let view = mapped ? s.regionViews!.mapped : s.regionViews!.unmapped
            s.tree = view.0
            publishTree(s.tree)
            s.regionMapped = mapped
            s.generation += 1
            publisher.publish(ShadowSnapshot(roots: view.1, generation: s.generation))
            _ = pr
            // Adding translations needs no invalidation (nothing can have cached a not-present
            // entry); removing them does, in every hierarchy.
            return mapped ? [] : HierarchyID.allCases.map { Invalidation(hierarchy: $0, range: r.range) }
        }
        for inv in invs { try backendVM.invalidate(inv) }
        counters.invalidations.wrappingAdd(UInt64(invs.count), ordering: .relaxed)
    }

    // MARK: memory

    private func checkMemory(_ gpa: UInt64, _ len: Int) throws(NPTError) {
        let (end, o) = gpa.addingReportingOverflow(UInt64(len))
        if o || end > config.ramSize {
            throw NPTError(.outOfRange, "[\(hex(gpa)), +\(hex(UInt64(len)))) is outside guest RAM (\(hex(config.ramSize)))")
        }
    }
    package func writeMemory(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(NPTError) {
        try checkMemory(gpa.raw, bytes.count)
        try life.withLease { () throws(NPTError) in try backendVM.writeMemory(gpa, bytes) }
    }
    /// Reads guest RAM, or (on a backend with persistent memory) what the VM sees of an NVDIMM range.
    package func readMemory(_ gpa: GPA, _ into: UnsafeMutableRawBufferPointer) throws(NPTError) {
        let (end, o) = gpa.raw.addingReportingOverflow(UInt64(into.count))
        if !o, nvdimmRanges.contains(where: { gpa.raw >= $0.range.start.raw && end <= $0.range.end }) {
            try life.withLease { () throws(NPTError) in try backendVM.readMemory(gpa, into) }
            return
        }
        try checkMemory(gpa.raw, into.count)
        try life.withLease { () throws(NPTError) in try backendVM.readMemory(gpa, into) }
    }
    package func writeMemory(_ gpa: GPA, bytes: [UInt8]) throws(NPTError) {
        var err: NPTError?
        bytes.withUnsafeBytes { b in
            do throws(NPTError) { try writeMemory(gpa, b) } catch { err = error }
        }
        if let err { throw err }
    }

    // MARK: vCPUs

    /// Creates a vCPU. A policy published while the backend builds it must still reach it: the
    /// backend may have read the hierarchies before it listed the vCPU for invalidations, so if the
    /// published generation moved meanwhile the new vCPU's translations are all invalidated before
    /// it can run. Holds a lease on the VM throughout: a destroy racing it waits for it, so the
    /// backend never builds a vCPU of a destroyed VM. At most `maxVCPUs` at once.
    package func makeVCPU(index: UInt32) throws(NPTError) -> VirtualCPU {
        try life.withLease { () throws(NPTError) in try makeVCPULeased(index: index) }
    }

    private func makeVCPULeased(index: UInt32) throws(NPTError) -> VirtualCPU {
        let limit = VirtualMachine.maxVCPUs
        try vcpus.withLock { (t: inout VCPUTable) throws(NPTError) in
            if t.map[index] != nil || t.creating.contains(index) { throw NPTError(.exists, "vCPU \(index) already exists") }
            if t.map.count + t.creating.count >= limit {
                throw NPTError(.outOfRange, "the VM has \(limit) vCPUs, the most a VM may have (destroy one first)")
            }
            t.creating.insert(index)
        }
        let generation = publisher.currentSnapshot().generation
        let b: any BackendVCPU
        do { b = try backendVM.makeVCPU(index: index) } catch {
            vcpus.withLock { _ = $0.creating.remove(index) }
            throw error
        }
        let v = VirtualCPU(vm: self, index: index, backend: b)
        do throws(NPTError) {
            try b.expose(.supervisor)
            try b.setExitControls([])
            if publisher.currentSnapshot().generation != generation {
                for h in HierarchyID.allCases {
                    try backendVM.invalidate(Invalidation(hierarchy: h, range: GPARange(start: GPA(0), size: PolicyTree.maxGuestPhysical)))
                }
            }
        } catch {
            b.destroy()
            vcpus.withLock { _ = $0.creating.remove(index) }
            throw error
        }
        v.slot = privileged.register(v)
        vcpus.withLock { t in
            t.creating.remove(index)
            t.map[index] = v
        }
        return v
    }

    /// Destroys a vCPU, all or nothing, once: `.busy` while a thread drives it (a run in progress)
    /// or while it holds the privileged mode; `.badHandle` once destroyed.
    package func removeVCPU(_ v: VirtualCPU) throws(NPTError) {
        guard v.vm === self else { throw .invalid("vCPU \(v.index) belongs to another VM") }
        try life.withLease { () throws(NPTError) in
            try v.beginClose()
            do throws(NPTError) { try privileged.unregister(v) } catch {
                v.cancelClose()
                throw error
            }
            _ = vcpus.withLock { $0.map.removeValue(forKey: v.index) }
            v.backend.destroy()
            v.finishClose()
        }
    }

    package var allVCPUs: [VirtualCPU] { vcpus.withLock { Array($0.map.values) }.sorted { $0.index < $1.index } }

    /// Destroys the VM and its vCPUs: all or nothing, exactly once. Waits for calls in flight on
    /// other threads (creates, policy updates, ...; `destroyWaitNanos` at most); refused with
    /// `.busy` while a vCPU runs (nothing is destroyed then); `.badHandle` once destroyed.
    package func destroy() throws(NPTError) {
        try life.beginClose(timeoutNanos: VirtualMachine.destroyWaitNanos)
        let all = allVCPUs
        var closed: [VirtualCPU] = []
        for v in all {
            do throws(NPTError) { try v.beginClose() } catch {
                for c in closed { c.cancelClose() }
                life.cancelClose()
                throw error
            }
            closed.append(v)
        }
        tearDown(all)
        life.finishClose()
    }

    private func tearDown(_ all: [VirtualCPU]) {
        vcpus.withLock { $0.map.removeAll() }
        for v in all {
            v.backend.destroy()
            v.finishClose()
        }
        privileged.shutdown()
        backendVM.destroy()
    }

    /// A VM dropped without `destroy()` still releases its backend's VM and vCPUs (guest memory).
    deinit {
        if life.current != .closed { tearDown(allVCPUs) }
    }

    /// The backend's own counters for this VM (npt_vm_backend_stats). Any thread; refused once the
    /// VM is destroyed (the backend's VM is never reached after its destroy).
    package func backendStatistics() throws(NPTError) -> [BackendStatistic] {
        try life.withLease { () throws(NPTError) in try backendVM.backendStatistics() }
    }

    package func statistics() -> VMStatistics {
        var s = VMStatistics()
        let c = counters
        s.exitsTotal = c.exitsTotal.load(ordering: .relaxed)
        s.exitsEscalation = c.exitsEscalation.load(ordering: .relaxed)
        s.exitsReturnToUser = c.exitsReturnToUser.load(ordering: .relaxed)
        s.exitsEPTViolation = c.exitsEPTViolation.load(ordering: .relaxed)
        s.hierarchySwitches = c.hierarchySwitches.load(ordering: .relaxed)
        s.violationsReported = c.violationsReported.load(ordering: .relaxed)
        s.policyUpdates = c.policyUpdates.load(ordering: .relaxed)
        s.invalidations = c.invalidations.load(ordering: .relaxed)
        for v in allVCPUs {
            // A vCPU destroyed meanwhile is skipped (its backend is never reached after its destroy).
            guard let k = try? v.backendStatistics() else { continue }
            s.instructions += k.value(BackendStatistic.instructions) ?? 0
            s.tlbHits += k.value(BackendStatistic.tlbHits) ?? 0
            s.tlbMisses += k.value(BackendStatistic.tlbMisses) ?? 0
        }
        let n = snapshot.nodeCounts()
        s.shadowNodes = UInt64(n.all)
        s.shadowNodesSingle = UInt64(n.perHierarchy[0])
        return s
    }
}
