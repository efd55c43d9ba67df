// The backend's statistics (npt_backend_ops.vm_stats / vcpu_stats, ABI 1.3): counters per VM and per
// vCPU, read by name through npt_vm_backend_stats / npt_vcpu_backend_stats. The names and what they
// count: Plugins/KVM/README.md, "Statistics". The core's standard names (instructions, tlb_hits,
// tlb_misses, outside_while_visible) are not reported: KVM counts neither retired instructions nor
// TLB hits, and a count it does not have is left out rather than reported as 0.
import CNPTKit
import Synchronization

/// A statistic's key: its stable name (a static C string, valid for the process's life).
protocol StatisticKey: CaseIterable, RawRepresentable where RawValue == Int {
    var name: StaticString { get }
}

/// The VM's counters.
enum VMStatistic: Int, StatisticKey {
    case layoutInstalls, memslotUpdates, memslotUpdatesLastInstall
    case mmioCompletedRAM, mmioCompletedNVDIMM
    case viewsCreated, viewMoves, viewZaps, dirtyLogReads, steadyMoves, steadyMoveNanos
    case physicalFlushes, physicalFlushNanos
    case privilegedEntries, privilegedLeaves, rsmExits, regionUnbackedReads, regionEntryMoveNanos, regionLeaveMoveNanos

    var name: StaticString {
        switch self {
        case .layoutInstalls: "layout_installs"
        case .memslotUpdates: "memslot_updates"
        case .memslotUpdatesLastInstall: "memslot_updates_last_install"
        case .mmioCompletedRAM: "mmio_completed_ram"
        case .mmioCompletedNVDIMM: "mmio_completed_nvdimm"
        case .viewsCreated: "views_created"
        case .viewMoves: "view_moves"
        case .viewZaps: "view_zaps"
        case .dirtyLogReads: "dirty_log_reads"
        case .steadyMoves: "steady_moves"
        case .steadyMoveNanos: "steady_move_ns"
        case .physicalFlushes: "physical_flushes"
        case .physicalFlushNanos: "physical_flush_ns"
        case .privilegedEntries: "privileged_entries"
        case .privilegedLeaves: "privileged_leaves"
        case .rsmExits: "rsm_exits"
        case .regionUnbackedReads: "region_unbacked_reads"
        case .regionEntryMoveNanos: "region_entry_move_ns"
        case .regionLeaveMoveNanos: "region_leave_move_ns"
        }
    }
}

/// A vCPU's counters.
enum VCPUStatistic: Int, StatisticKey {
    case kvmRuns, viewMoves, privilegedEntries, inPrivilegedMode

    var name: StaticString {
        switch self {
        case .kvmRuns: "kvm_runs"
        case .viewMoves: "view_moves"
        case .privilegedEntries: "privileged_entries"
        case .inPrivilegedMode: "in_privileged_mode"
        }
    }
}

/// Counters by key. A lock, not atomics: they change at most once per KVM ioctl (microseconds each).
final class Counters<Key: StatisticKey>: Sendable {
    private let values = Mutex<[UInt64]>([UInt64](repeating: 0, count: Key.allCases.count))

    func add(_ k: Key, _ n: UInt64 = 1) { values.withLock { $0[k.rawValue] &+= n } }
    func set(_ k: Key, _ n: UInt64) { values.withLock { $0[k.rawValue] = n } }
    subscript(_ k: Key) -> UInt64 { values.withLock { $0[k.rawValue] } }

    /// The vm_stats / vcpu_stats contract: *count always, the pairs when cap suffices.
    func report(_ out: UnsafeMutablePointer<npt_backend_stat>?, _ cap: Int, _ count: UnsafeMutablePointer<Int>?) -> npt_status {
        guard let count else { return fail(NPT_ERR_INVALID_ARGUMENT, "statistics: NULL count") }
        let keys = Array(Key.allCases)
        count.pointee = keys.count
        guard cap >= keys.count else { return NPT_ERR_BUFFER_TOO_SMALL }
        guard let out else { return fail(NPT_ERR_INVALID_ARGUMENT, "statistics: NULL array with room for \(cap)") }
        let snapshot = values.withLock { $0 }
        for (i, k) in keys.enumerated() {
            let name = UnsafeRawPointer(k.name.utf8Start).assumingMemoryBound(to: CChar.self)
            out[i] = npt_backend_stat(name: name, value: snapshot[k.rawValue])
        }
        return NPT_OK
    }
}

extension KVMVM {
    func statistics(_ out: UnsafeMutablePointer<npt_backend_stat>?, _ cap: Int, _ count: UnsafeMutablePointer<Int>?) -> npt_status {
        stats.report(out, cap, count)
    }
}

extension KVMVCPU {
    func statistics(_ out: UnsafeMutablePointer<npt_backend_stat>?, _ cap: Int, _ count: UnsafeMutablePointer<Int>?) -> npt_status {
        stats.report(out, cap, count)
    }
}
