import CNPTKit
import NPTCore
@testable import NPTKit
import NPTTrace
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// npt_backend_ops.vm_lock_turn (ABI 1.5) is optional: a table whose size does not cover it (an
/// older backend), or that leaves it NULL, takes no turns (the coordinator pays one check); a table
/// that has it orders the acquisitions, gets the phase, site and vCPU (-1 for the VMM), may replace
/// the value, and its failure (NPT_ERR_BUSY: retry) reaches the core as that status.
@Suite struct LockTurnOpTests {
    nonisolated(unsafe) static var seen: [(UInt32, UInt32, Int64, UInt64)] = []

    static func backend(size: Int, op: Bool) throws -> CBackendVM {
        var o = npt_backend_ops()
        o.abi_version = NPT_ABI_VERSION
        o.size = UInt32(size)
        o.name = UnsafePointer(strdup("turns"))
        if op {
            o.vm_lock_turn = { _, phase, site, vcpu, value in
                LockTurnOpTests.seen.append((phase, site, vcpu, value!.pointee))
                if site == NPT_LOCK_SITE_READ { return NPT_ERR_BUSY }
                value!.pointee = 7
                return NPT_OK
            }
        }
        return CBackendVM(backend: try withUnsafePointer(to: &o) { p throws(NPTError) in try CBackend(p, isPlugin: false) }, data: nil, handle: 0)
    }

    @Test func theOpIsUsedOnlyWhereTheTableHasIt() throws {
        let full = MemoryLayout<npt_backend_ops>.size
        let before = MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.vm_lock_turn)!
        #expect(before + MemoryLayout<UnsafeRawPointer>.size == full, "vm_lock_turn is the table's last member (sizes only grow)")
        // A 1.4-sized table (its pointer past the size is not the backend's) and a NULL op: no turns.
        for vm in [try Self.backend(size: before, op: true), try Self.backend(size: full, op: false)] {
            #expect(vm.lockTurns == .none)
            #expect(try vm.lockTurn(.entryWake, vcpu: 1, phase: .taken, value: 1) == 1)
        }
        #expect(Self.seen.isEmpty)
        let vm = try Self.backend(size: full, op: true)
        #expect(vm.lockTurns == .replay)
        #expect(try vm.lockTurn(.entryWake, vcpu: 2, phase: .wait, value: 1) == 7)
        #expect(try vm.lockTurn(.entryWake, vcpu: 2, phase: .taken, value: 1) == 7)
        #expect(throws: NPTError.self) { _ = try vm.lockTurn(.read, vcpu: nil, phase: .taken, value: 0) }
        do { _ = try vm.lockTurn(.read, vcpu: nil, phase: .taken, value: 0) } catch { #expect(error.code == .busy) }
        // WAIT passes 0 (the value is not read back); TAKEN the core's outcome; the VMM is vCPU -1.
        #expect(Self.seen.map { "\($0.0) \($0.1) \($0.2) \($0.3)" } == ["0 6 2 0", "1 6 2 1", "1 8 -1 0", "1 8 -1 0"])
        #expect(TraceLockSite.allCases.map { UInt32($0.rawValue) } == [NPT_LOCK_SITE_RAISE, NPT_LOCK_SITE_INTERRUPT, NPT_LOCK_SITE_CHECKPOINT,
            NPT_LOCK_SITE_CHECKPOINT_WAKE, NPT_LOCK_SITE_LEFT_GUEST, NPT_LOCK_SITE_ENTRY_RELOCK, NPT_LOCK_SITE_ENTRY_WAKE,
            NPT_LOCK_SITE_LEAVE, NPT_LOCK_SITE_READ, NPT_LOCK_SITE_VCPU_READ])
        #expect(LockTurnPhase.wait.rawValue == NPT_LOCK_TURN_WAIT && LockTurnPhase.taken.rawValue == NPT_LOCK_TURN_TAKEN)
    }
}
