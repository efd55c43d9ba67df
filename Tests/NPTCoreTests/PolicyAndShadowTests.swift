import NPTCore
import Testing
import NPTScenarios


let validPerms: [EPTPermissions] = [[], [.read], [.read, .write], [.read, .supervisorExecute], [.read, .userExecute],
                                    [.read, .supervisorExecute, .userExecute], .all, [.supervisorExecute], [.userExecute],
                                    [.supervisorExecute, .userExecute]]

/// The policy tree and both shadow hierarchies against a naive per-page model, over random updates
/// at 4 KiB, 2 MiB and 1 GiB granularity.
@Suite struct PolicyAndShadowTests {
    @Test(arguments: [(UInt64(16 << 20), UInt64(1)), (UInt64(0x300_5000), UInt64(2)), (UInt64(2 << 30) + 0x20_0000, UInt64(3))])
    func randomUpdatesMatchNaiveModel(ram: UInt64, seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        let pages = Int(ram >> 12)
        var naive = [EPTPermissions](repeating: [.read, .write], count: pages)
        var tree = PolicyTree(ramSize: ram, defaultPermissions: [.read, .write])
        var builder = ShadowBuilder()
        for step in 0..<60 {
            let size: PageSize = [.size4K, .size4K, .size2M, .size1G][Int(rng.next() % 4)]
            let units = ram / size.bytes
            guard units > 0 else { continue }
            let start = (rng.next() % units) * size.bytes
            let count = min(1 + rng.next() % 3, (ram - start) / size.bytes)
            let p = validPerms[Int(rng.next() % UInt64(validPerms.count))]
            let r = PolicyRange(start: GPA(start), size: count * size.bytes, pageSize: size, permissions: p)
            #expect(throws: Never.self) { try tree.validate(r) }
            tree.apply(r)
            for f in Int(start >> 12)..<Int((start + count * size.bytes) >> 12) { naive[f] = p }
            // Check a sample of pages every step, and all of them at the end.
            let snap = builder.snapshot(of: tree, generation: UInt64(step))
            let check: [Int] = step == 59 ? Array(0..<pages) : (0..<256).map { _ in Int(rng.next() % UInt64(pages)) }
            for f in check {
                let gpa = GPA(UInt64(f) << 12)
                #expect(tree.permissions(at: gpa) == naive[f], "seed \(seed) step \(step) page \(f)")
                for h in HierarchyID.allCases {
                    let t = snap.translate(gpa, in: h)
                    let want = naive[f].projected(onto: h)
                    #expect(t.permissions == want, "seed \(seed) step \(step) page \(f) \(h): \(t.permissions) want \(want)")
                    #expect(t.present == (want.rawValue != 0))
                }
            }
        }
        // runs() agrees with the naive model.
        var rebuilt = [EPTPermissions](repeating: [], count: pages)
        for (r, p) in tree.runs() { for f in Int(r.start.raw >> 12)..<Int(r.end >> 12) { rebuilt[f] = p } }
        #expect(rebuilt == naive)
    }

    @Test func largeLeavesCollapseAndSplit() {
        var tree = PolicyTree(ramSize: 8 << 20, defaultPermissions: [.read, .write])
        var b = ShadowBuilder()
        #expect(b.snapshot(of: tree, generation: 0).translate(GPA(0x20_0000), in: .supervisor).level == 2)
        tree.apply(PolicyRange(start: GPA(0x20_3000), size: 0x1000, pageSize: .size4K, permissions: [.read, .supervisorExecute]))
        var s = b.snapshot(of: tree, generation: 1)
        #expect(s.translate(GPA(0x20_3000), in: .supervisor).level == 1)
        #expect(s.translate(GPA(0x40_0000), in: .supervisor).level == 2)
        // Every page of the block made uniform again: one 2 MiB leaf.
        tree.apply(PolicyRange(start: GPA(0x20_3000), size: 0x1000, pageSize: .size4K, permissions: [.read, .write]))
        s = b.snapshot(of: tree, generation: 2)
        #expect(s.translate(GPA(0x20_3000), in: .supervisor).level == 2)
    }

    @Test func leavesAreOrderedAndAgreeWithTranslate() {
        var tree = PolicyTree(ramSize: 8 << 20, defaultPermissions: [.read, .write])
        tree.apply(PolicyRange(start: GPA(0x10_0000), size: 0x3000, pageSize: .size4K, permissions: [.read, .userExecute]))
        tree.apply(PolicyRange(start: GPA(0x30_0000), size: 0x1000, pageSize: .size4K, permissions: []))
        var b = ShadowBuilder()
        let s = b.snapshot(of: tree, generation: 0)
        for h in HierarchyID.allCases {
            var last: UInt64 = 0
            var total: UInt64 = 0
            s.forEachLeaf(in: h) { gpa, size, perms in
                #expect(gpa.raw >= last)
                last = gpa.raw + size
                total += size
                #expect(s.translate(gpa, in: h).permissions == perms)
            }
            #expect(total == (8 << 20) - 0x1000)
        }
    }

    @Test func sharingDependsOnMixingWithinA2MiBBlock() {
        // Regions each alone in its 2 MiB block: only the roots differ.
        var tree = PolicyTree(ramSize: 1 << 30, defaultPermissions: [.read, .write])
        for i in 0..<64 {
            let p: EPTPermissions = i % 2 == 0 ? [.read, .supervisorExecute] : [.read, .userExecute]
            tree.apply(PolicyRange(start: GPA(UInt64(i) << 21), size: 0x1000, pageSize: .size4K, permissions: p))
        }
        var b = ShadowBuilder()
        let n = b.snapshot(of: tree, generation: 0).nodeCounts()
        // Per hierarchy: root, PDPT, PD, 64 PTs = 67; together the PT tables and PD are shared.
        #expect(n.perHierarchy == [67, 67])
        #expect(n.all <= 67 + 4)
        // The same blocks each holding both an Xs-only and an Xu-only page: a PT per hierarchy.
        for i in 0..<64 {
            tree.apply(PolicyRange(start: GPA((UInt64(i) << 21) + 0x1000), size: 0x1000, pageSize: .size4K,
                                   permissions: i % 2 == 0 ? [.read, .userExecute] : [.read, .supervisorExecute]))
        }
        let m = b.snapshot(of: tree, generation: 1).nodeCounts()
        #expect(m.all >= 2 * 64 + 2)
    }

    @Test func validationRules() {
        let tree = PolicyTree(ramSize: 4 << 20, defaultPermissions: [.read, .write])
        func code(_ r: PolicyRange) -> NPTError.Code? {
            do { try tree.validate(r); return nil } catch { return error.code }
        }
        #expect(code(PolicyRange(start: GPA(0x1800), size: 0x1000, pageSize: .size4K, permissions: [.read])) == .misaligned)
        #expect(code(PolicyRange(start: GPA(0x1000), size: 0x1800, pageSize: .size4K, permissions: [.read])) == .misaligned)
        #expect(code(PolicyRange(start: GPA(0x1000), size: 0x1000, pageSize: .size2M, permissions: [.read])) == .misaligned)
        #expect(code(PolicyRange(start: GPA(0x1000), size: 0, pageSize: .size4K, permissions: [.read])) == .invalidArgument)
        #expect(code(PolicyRange(start: GPA(0x1000), size: 0x1000, pageSize: .size4K, permissions: [.write])) == .invalidArgument)
        #expect(code(PolicyRange(start: GPA(0x1000), size: 0x1000, pageSize: .size4K, permissions: EPTPermissions(rawValue: 1 << 5))) == .invalidArgument)
        #expect(code(PolicyRange(start: GPA(0x3F_F000), size: 0x2000, pageSize: .size4K, permissions: [.read])) == .outOfRange)
        #expect(code(PolicyRange(start: GPA(0x3F_F000), size: 0x1000, pageSize: .size4K, permissions: [.read])) == nil)
    }

    @Test func updateCostDoesNotGrowWithGuestSize() {
        func rebuilt(_ ram: UInt64) -> UInt64 {
            var tree = PolicyTree(ramSize: ram, defaultPermissions: [.read, .write])
            var rng = SplitMix64(seed: 9)
            for _ in 0..<500 {
                tree.apply(PolicyRange(start: GPA((rng.next() % (ram >> 12)) << 12), size: 0x1000, pageSize: .size4K,
                                       permissions: [.read, .supervisorExecute]))
            }
            var b = ShadowBuilder()
            _ = b.snapshot(of: tree, generation: 0)
            let before = b.nodesBuilt
            tree.apply(PolicyRange(start: GPA(ram / 2), size: 0x1000, pageSize: .size4K, permissions: [.read, .userExecute]))
            _ = b.snapshot(of: tree, generation: 1)
            return b.nodesBuilt - before
        }
        let small = rebuilt(1 << 30), large = rebuilt(1 << 40)
        #expect(small <= 12 && large <= 12, "rebuilt \(small) and \(large) tables")
    }
}

@Suite struct InvalidationAndRegistryTests {
    final class NullBackend: Backend, @unchecked Sendable {
        let name: String
        let summary = "test"
        let capabilities: BackendCapabilities
        let guestISA = GuestISA.none
        let abiVersion: UInt32
        init(_ name: String, caps: BackendCapabilities = [.mbecEmulation, .exitOnEscalation, .exitOnReturn, .linearModeInfo],
             abi: UInt32 = NPTABI.version) {
            self.name = name; capabilities = caps; abiVersion = abi
        }
        var invalidations: [Invalidation] = []
        var failInvalidate = false
        func makeVM(config: VMConfig, hierarchies: any HierarchyProvider, handle: UnsafeMutableRawPointer?) throws(NPTError) -> any BackendVM { VMImpl(self) }
        final class VMImpl: BackendVM, @unchecked Sendable {
            let b: NullBackend
            init(_ b: NullBackend) { self.b = b }
            func writeMemory(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(NPTError) {}
            func readMemory(_ gpa: GPA, _ into: UnsafeMutableRawBufferPointer) throws(NPTError) {}
            func invalidate(_ inv: Invalidation) throws(NPTError) {
                if b.failInvalidate { throw NPTError(.backend, "refused") }
                b.invalidations.append(inv)
            }
            func makeVCPU(index: UInt32) throws(NPTError) -> any BackendVCPU { throw .unsupported("no vCPUs") }
            func destroy() {}
        }
    }

    func vm(_ b: NullBackend) throws -> VirtualMachine {
        let r = BackendRegistry()
        try r.register(b)
        return try VirtualMachine(config: VMConfig(ramSize: 4 << 20), registry: r)
    }

    @Test func invalidationsOnlyWhereAProjectionChanged() throws {
        let b = NullBackend("n")
        let v = try vm(b)
        let page = PolicyRange(start: GPA(0x1000), size: 0x1000, pageSize: .size4K, permissions: [.read, .write])
        func set(_ p: EPTPermissions) throws -> Set<HierarchyID> {
            var r = page; r.permissions = p
            return Set(try v.setPolicy(r).map(\.hierarchy))
        }
        #expect(try set([.read, .write]) == [])                                     // unchanged
        #expect(try set([.read, .write, .supervisorExecute]) == [.supervisor])       // X only in S
        #expect(try set([.read, .userExecute]) == [.supervisor, .user])              // W gone, X moves
        #expect(try set([.read, .userExecute, .supervisorExecute]) == [.supervisor])
        #expect(try set([.read]) == [.supervisor, .user])
        #expect(b.invalidations.allSatisfy { $0.range == page.range })
    }

    @Test func batchIsAllOrNothing() throws {
        let b = NullBackend("n")
        let v = try vm(b)
        let good = PolicyRange(start: GPA(0x1000), size: 0x1000, pageSize: .size4K, permissions: [.read, .supervisorExecute])
        let overlapping = PolicyRange(start: GPA(0), size: 0x2000, pageSize: .size4K, permissions: [.read])
        let past = PolicyRange(start: GPA(4 << 20), size: 0x1000, pageSize: .size4K, permissions: [.read])
        #expect(throws: NPTError.self) { try v.setPolicy([good, overlapping]) }
        #expect(throws: NPTError.self) { try v.setPolicy([good, past]) }
        #expect(try v.permissions(at: GPA(0x1000)) == [.read, .write])
        b.failInvalidate = true
        #expect(throws: NPTError.self) { try v.setPolicy(good) }
        #expect(try v.permissions(at: GPA(0x1000)) == [.read, .write], "a refused invalidation must restore the policy")
        #expect(!v.snapshot.translate(GPA(0x1000), in: .supervisor).permissions.contains(.execute))
    }

    @Test func registryAndCapabilityErrors() throws {
        let r = BackendRegistry()
        try r.register(NullBackend("a"))
        func code(_ body: () throws -> Void) -> NPTError.Code? {
            do { try body(); return nil } catch let e as NPTError { return e.code } catch { return nil }
        }
        #expect(code { try r.register(NullBackend("a")) } == .exists)
        #expect(code { try r.register(NullBackend("b", abi: 2 << 16)) } == .abiMismatch)
        #expect(code { _ = try r.lookup("zzz") } == .notFound)
        #expect(try r.lookup(nil).name == "a")
        try r.register(NullBackend("c"), makeDefault: true)
        #expect(try r.lookup(nil).name == "c")
        // A mode the backend cannot keep is refused (NPT_ERR_GUARANTEE), the weakest one accepted.
        let noExits = BackendRegistry()
        try noExits.register(NullBackend("x", caps: [.mbecEmulation]))
        #expect(code { _ = try VirtualMachine(config: VMConfig(ramSize: 1 << 20), registry: noExits) } == .guarantee)
        #expect(code { _ = try VirtualMachine(config: VMConfig(ramSize: 1 << 20, mbecMode: .lazy), registry: noExits) } == .guarantee)
        #expect(throws: Never.self) { _ = try VirtualMachine(config: VMConfig(ramSize: 1 << 20, mbecMode: .violationOnly), registry: noExits) }
        let escalationOnly = BackendRegistry()
        try escalationOnly.register(NullBackend("e", caps: [.mbecEmulation, .exitOnEscalation]))
        #expect(code { _ = try VirtualMachine(config: VMConfig(ramSize: 1 << 20), registry: escalationOnly) } == .guarantee)
        #expect(throws: Never.self) { _ = try VirtualMachine(config: VMConfig(ramSize: 1 << 20, mbecMode: .lazy), registry: escalationOnly) }
        let noMBEC = BackendRegistry()
        try noMBEC.register(NullBackend("y", caps: [.exitOnEscalation, .exitOnReturn, .linearModeInfo]))
        #expect(code { _ = try VirtualMachine(config: VMConfig(ramSize: 1 << 20), registry: noMBEC) } == .unsupported)
    }
}
