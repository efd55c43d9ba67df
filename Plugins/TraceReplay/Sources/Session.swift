// A replay session: one pass over one trace, shared by every load of the plugin that names the
// same session (default: the trace's path), so a VMM that loads the plugin again for a later part
// of its run (the CLI's NVDIMM section makes a registry per kind of host region) continues the
// same pass. Memory is O(1) in the trace's length: one reader, one pending record, the context
// window, and the numbers of the recorded VMs that are not replayed.
import CNPTKit
import NPTTrace
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What a replayed call gets: the recorded record, or the status and message it must fail with.
enum Outcome {
    case record(TraceRecord)
    case failure(npt_status, String)
}

final class ReplaySession: @unchecked Sendable {
    let path: String
    let backend: TraceBackendInfo
    /// Whether the trace has lock turns (1.2): the order in which the recorded run took its
    /// privileged-mode coordinator's monitor. Then this backend keeps NPT_CAP_PRIVILEGED_MODE and
    /// makes each acquisition wait for its turn (vm_lock_turn): what a raise, a checkpoint or a
    /// wake-up sees is what the recorded one saw, so the same vCPUs are stopped, kicked and entered
    /// (docs/replay-privileged-mode.md).
    let hasLockTurns: Bool
    /// Without lock turns (a 1.1 trace), recorded VMs that used the privileged mode (a
    /// define-region): this backend withholds NPT_CAP_PRIVILEGED_MODE, so the core never creates
    /// them again: their records are passed over. Which backend calls such a run makes depends on
    /// the order of the coordinator's monitor acquisitions, which such a trace does not have.
    let skippedVMs: Set<UInt32>
    /// The recorded VMs (vm-create records), those passed over included.
    let recordedVMs: Int
    let recordCount: UInt64
    let waitNanos: UInt64

    private struct State {
        /// nil once the pass failed: nothing more is read, and the file and its block buffer are
        /// released (a process may replay many traces; its sessions live as long as it does).
        var reader: TraceReader?
        var pending: TraceEvent?
        var currentVM: UInt32 = 0
        var checker: DecisionChecker
        var failure: String?
        var compared: UInt64 = 0
    }
    private let state: Mutex<State>
    /// This session's backend operations (`makeOps`), made at its first load and given to every
    /// later one: the host never says when it is done with a table, so one a load would leak.
    private let opsTable = Mutex<UnsafeMutablePointer<npt_backend_ops>?>(nil)

    func ops(_ make: (ReplaySession) -> UnsafeMutablePointer<npt_backend_ops>) -> UnsafeMutablePointer<npt_backend_ops> {
        opsTable.withLock { t in
            if let t { return t }
            let made = make(self)
            t = made
            return made
        }
    }

    /// Reads the whole trace once (every block checked: a bad trace is refused here, before
    /// anything is replayed) for its backend and the VMs not replayed, then opens it for the pass.
    init(path: String, context: Int, waitNanos: UInt64) throws(TraceError) {
        self.path = path
        self.waitNanos = waitNanos
        let scan = try TraceReader(path: path)
        var info: TraceBackendInfo?
        var vm: UInt32 = 0
        var skipped = Set<UInt32>()
        var vms = 0
        var turns = false
        while let e = try scan.next() {
            switch e.record {
            case .vmSelect(let v): vm = v
            case .vmCreate: vms += 1
            case .backendInfo(let b): if info == nil { info = b }
            case .defineRegion: skipped.insert(vm)
            case .lockTurn: turns = true
            default: break
            }
        }
        hasLockTurns = turns
        if turns { skipped = [] }
        guard let info else {
            throw TraceError(.invalidRecord, at: 0, "the trace has no backend record: it was not written by NPTKit's recording layer (record with --record or npt_vm_config.record_path)")
        }
        backend = info
        skippedVMs = skipped
        recordedVMs = vms
        recordCount = scan.recordIndex
        state = Mutex(State(reader: try TraceReader(path: path), checker: DecisionChecker(context: context)))
    }

    /// The next record of VM `vm` (nil: whichever VM the trace is at) and vCPU `owner` (nil: a
    /// VM-wide record), which must be of `kind` and satisfy `matches`; `what` describes the call for
    /// a divergence. Another thread's record first: waits (up to waitNanos) for that thread to take
    /// it, so a run whose threads made calls in a recorded order is replayed in that order.
    func take(vm: UInt32?, owner: UInt32?, kind: UInt8, what: @autoclosure () -> String,
              matches: (TraceRecord) -> Bool = { _ in true }, replayed: TraceRecord? = nil) -> (Outcome, vm: UInt32) {
        var waited: UInt64 = 0
        while true {
            let r: (Outcome, UInt32)? = state.withLock { s in
                if let f = s.failure { return (.failure(NPT_ERR_STATE, f), s.currentVM) }
                while true {
                    if let o = peek(&s) { return (o, s.currentVM) }
                    guard let e = s.pending else {
                        return (fail(&s, nil, what()), s.currentVM)
                    }
                    // Someone else's record: wait for its thread (a lock turn is taken by `turn` only).
                    if let vm, vm != s.currentVM { return nil }
                    if case .lockTurn = e.record { return nil }
                    if e.record.vcpu != owner && !(kind == RecordKind.vcpuCreate && owner != nil) { return nil }
                    s.pending = nil
                    if case .failure(_, let k, let status, let message) = e.record, k == kind {
                        s.checker.observe(e)
                        return (.failure(npt_status(rawValue: status), message), s.currentVM)
                    }
                    guard e.record.kind == kind && matches(e.record) else {
                        return (fail(&s, e, what(), replayed: replayed), s.currentVM)
                    }
                    s.checker.observe(e)
                    s.compared += 1
                    // A call the recording layer records before making it (a decision) and whose
                    // failure follows: the same failure now.
                    if s.pending == nil { s.pending = try? s.reader?.next() }
                    if let f = s.pending, case .failure(let v, let k, let status, let message) = f.record, k == kind, v == owner {
                        s.pending = nil
                        s.checker.observe(f)
                        return (.failure(npt_status(rawValue: status), message), s.currentVM)
                    }
                    return (.record(e.record), s.currentVM)
                }
            }
            if let r { return (r.0, r.1) }
            if waited >= waitNanos { return (.failure(NPT_ERR_STATE, waitedTooLong(what())), vm ?? 0) }
            var ts = timespec(tv_sec: 0, tv_nsec: 50_000)
            nanosleep(&ts, nil)
            waited += 50_000
        }
    }

    /// Moves `pending` to the next record a call takes: the trace's own records (observed) and those
    /// of VMs not replayed are passed over. nil, or the failure to answer (a reader error, sticky).
    /// `pending` nil afterwards: the trace ends.
    private func peek(_ s: inout State) -> Outcome? {
        while true {
            if s.pending == nil {
                do throws(TraceError) { s.pending = try s.reader?.next() } catch {
                    s.failure = "replay of '\(path)': \(error); nothing after it is replayed"
                    s.reader = nil
                    return .failure(NPT_ERR_INVALID_ARGUMENT, s.failure!)
                }
            }
            guard let e = s.pending else { return nil }
            switch e.record {
            case .vmSelect(let v): s.currentVM = v; s.pending = nil; continue
            case .meta, .note, .backendInfo, .kick, .end: s.checker.observe(e); s.pending = nil; continue
            default: break
            }
            if skippedVMs.contains(s.currentVM) { s.pending = nil; continue }
            return nil
        }
    }

    /// The failure of a call that waited waitNanos for other threads to take the records before its
    /// own: the run is not the recorded one, so every later call fails with it too (sticky, like a
    /// divergence; the end-of-process check does not report the session again).
    private func waitedTooLong(_ what: String) -> String {
        state.withLock { s in
            if let f = s.failure { return f }
            let next = s.pending.map { "#\($0.index) (vm \(s.currentVM)) \($0.record)" } ?? "nothing"
            s.failure = "replay of '\(path)': \(what) waited \(waitNanos / 1_000_000) ms for another thread to take the recorded \(next)"
            s.reader = nil
            return s.failure!
        }
    }

    /// vm_lock_turn of VM `vm`: an acquisition of the privileged-mode monitor at `site` for `vcpu`.
    /// NPT_LOCK_TURN_WAIT: waits (up to waitNanos) until its lock-turn record is next; consumes
    /// nothing. NPT_LOCK_TURN_TAKEN (the monitor held): consumes it and answers its recorded value;
    /// NPT_ERR_BUSY when it is not next (another thread acting for the same party took it). A turn
    /// of the same party at another site is a divergence; past the trace's end, too.
    func turn(vm: UInt32, phase: UInt32, site: TraceLockSite, vcpu: UInt32?) -> (npt_status, UInt64, String?) {
        let replayed = TraceRecord.lockTurn(vcpu: vcpu, site: site, value: 0)
        var waited: UInt64 = 0
        while true {
            let r: (npt_status, UInt64, String?)? = state.withLock { s in
                if let f = s.failure { return (NPT_ERR_STATE, 0, f) }
                if case .failure(let st, let m) = peek(&s) { return (st, 0, m) }
                guard let e = s.pending else {
                    if case .failure(let st, let m) = fail(&s, nil, replayed.description) { return (st, 0, m) }
                    return nil
                }
                guard s.currentVM == vm, case .lockTurn(let v, let recorded, let value) = e.record, v == vcpu,
                      recorded.party == site.party else {
                    return phase == NPT_LOCK_TURN_TAKEN ? (NPT_ERR_BUSY, 0, nil) : nil
                }
                if recorded != site {
                    if case .failure(let st, let m) = fail(&s, e, replayed.description, replayed: replayed) { return (st, 0, m) }
                }
                guard phase == NPT_LOCK_TURN_TAKEN else { return (NPT_OK, 0, nil) }
                s.pending = nil
                s.checker.observe(e)
                s.compared += 1
                return (NPT_OK, value, nil)
            }
            if let r { return r }
            if waited >= waitNanos { return (NPT_ERR_STATE, 0, waitedTooLong(replayed.description)) }
            var ts = timespec(tv_sec: 0, tv_nsec: 50_000)
            nanosleep(&ts, nil)
            waited += 50_000
        }
    }

    /// Records the first divergence (sticky: every later call fails with it).
    private func fail(_ s: inout State, _ e: TraceEvent?, _ what: String, replayed: TraceRecord? = nil) -> Outcome {
        var m = "replay of '\(path)' diverged at event \(e.map { String($0.index) } ?? "end (the trace ends)")"
        if let e { m += " (byte offset \(e.offset), \(e.timestamp) ns), vm \(s.currentVM)" }
        m += "\n  recorded: \(e.map { $0.record.description } ?? "nothing (the trace ends)")"
        m += "\n  replayed: \(what)"
        // The fields that differ (recorded -> replayed), e.g. "rbx 0x2 -> 0x3" of regs-written.
        if let e, let replayed {
            let d = e.record.differingFields(replayed)
            if !d.isEmpty { m += "\n  differs in: \(d.joined(separator: ", "))" }
        }
        let ctx = s.checker.window.events
        if !ctx.isEmpty {
            m += "\n  before it:"
            for c in ctx { m += "\n    #\(c.index) \(c.record)" }
        }
        s.failure = m
        s.reader = nil
        return .failure(NPT_ERR_STATE, m)
    }

    var compared: UInt64 { state.withLock { $0.compared } }

    /// What of the trace this session never replayed, as a divergence: a run that made fewer VMs
    /// than recorded (or stopped short of a VM's recorded end) is not the recorded run. nil: the
    /// pass is complete, it already failed (that divergence was reported), or it replayed nothing
    /// (a plugin loaded to list the recorded backend). Consumes the rest of the trace: for the end of
    /// the process (`checkSessionsAtExit`), the only end of a session the C ABI lets a plugin see.
    func unfinished() -> String? {
        state.withLock { s in
            guard s.failure == nil, s.compared > 0 else { return nil }
            var vm = s.currentVM
            var left = 0
            var first: (TraceEvent, UInt32)?
            var vmsNotMade: [UInt32] = []
            while true {
                let next: TraceEvent?
                if let p = s.pending { next = p; s.pending = nil } else {
                    do throws(TraceError) { next = try s.reader?.next() } catch {
                        return "replay of '\(path)': \(error) after the run's last call"
                    }
                }
                guard let e = next else { break }
                switch e.record {
                case .vmSelect(let v): vm = v; continue
                case .meta, .note, .backendInfo, .kick, .end: continue
                default: break
                }
                if skippedVMs.contains(vm) { continue }
                left += 1
                if first == nil { first = (e, vm) }
                if case .vmCreate = e.record { vmsNotMade.append(vm) }
            }
            guard let (e, v) = first else { return nil }
            let replayedVMs = recordedVMs - skippedVMs.count - vmsNotMade.count
            var m = "replay of '\(path)' diverged at event \(e.index) (byte offset \(e.offset), \(e.timestamp) ns), vm \(v): the run ended there"
            if vmsNotMade.isEmpty {
                m += ", \(left) recorded calls before the recorded end were never made"
            } else {
                m += ": it created fewer VMs than recorded (\(replayedVMs) of \(recordedVMs - skippedVMs.count); never created: vm \(vmsNotMade.map(String.init).joined(separator: ", vm ")))"
            }
            m += "\n  recorded: \(e.record)\n  replayed: nothing (the run ended)"
            let ctx = s.checker.window.events
            if !ctx.isEmpty {
                m += "\n  before it:"
                for c in ctx { m += "\n    #\(c.index) \(c.record)" }
            }
            s.failure = m
            s.reader = nil
            return m
        }
    }
}

/// At the end of the process: every session that stopped short of its trace's end is reported on
/// stderr as a divergence, and the process exits with status 1 (buffers flushed first).
func checkSessionsAtExit() {
    let all = sessions.withLock { Array($0.values) }
    var failed = false
    for s in all {
        guard let m = s.unfinished() else { continue }
        let text = m + "\n"
        _ = text.withCString { write(2, $0, strlen($0)) }
        failed = true
    }
    if failed {
        fflush(nil)
        _exit(1)
    }
}

let exitCheckInstalled = Atomic<Bool>(false)
/// Installs `checkSessionsAtExit` once.
func installExitCheck() {
    guard exitCheckInstalled.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else { return }
    atexit { checkSessionsAtExit() }
}

/// Sessions by name, for the life of the process (the plugin is never unloaded).
let sessions = Mutex<[String: ReplaySession]>([:])
