/*
 * The privileged-mode (SMM-like) entry protocol of NPTKit, for spin.
 * Mirrors Sources/NPTCore/PrivilegedModeProtocol.swift: CPUs as processes, an interrupt source
 * raising R enter-mode requests at arbitrary times, a FIFO of queued requests, one mode holder.
 *
 * Safety (assertions after every atomic step): no CPU outside the mode runs while the region is
 * visible; no CPU outside the mode holds a translation to the region; after removal no translation
 * reaches it; at most one CPU is in the mode.
 * Liveness (ltl "served"): under weak fairness every raised request is eventually served.
 *
 * Broken variants (must be rejected): -DMAP_BEFORE_STOPPED (the region is added before the others
 * stopped), -DRESUME_BEFORE_UNMAP, -DNO_FLUSH.
 */
#ifndef N
#define N 3
#endif
#ifndef R
#define R 3
#endif

mtype = { RUNNING, WAITING, STOPPED, COORD, INMODE, LEAVING };

mtype phase[N];
bool stopReq[N];
byte pending[N];
bool reach[N];
bool queued[N];
chan q = [N] of { byte };
int holder = -1;
bool visible = false;
byte raised = 0;
byte served = 0;

/* The invariant, for one CPU j. */
#define OUTSIDE(j) (!(holder == j && phase[j] == INMODE))
#define OK(j) ( !(visible && OUTSIDE(j) && phase[j] == RUNNING) \
             && !(OUTSIDE(j) && reach[j] && phase[j] != LEAVING) \
             && !(!visible && reach[j] && phase[j] != INMODE) \
             && !(phase[j] == INMODE && !visible) )
#define INV (OK(0) && (N < 2 || OK(1)) && (N < 3 || OK(2)) && (N < 4 || OK(3)))
#define CHECK assert(INV)

#define STOPPED_OR_WAITING(j) (phase[j] == STOPPED || phase[j] == WAITING)
#define OTHERS_STOPPED(me) ( (me == 0 || STOPPED_OR_WAITING(0)) && (N < 2 || me == 1 || STOPPED_OR_WAITING(1)) \
                          && (N < 3 || me == 2 || STOPPED_OR_WAITING(2)) && (N < 4 || me == 3 || STOPPED_OR_WAITING(3)) )

inline setStops(me, v) {
    byte k = 0;
    do
    :: k < N -> if :: k != me -> stopReq[k] = v :: else -> skip fi; k++
    :: k == N -> break
    od
}
inline clearStops() {
    byte k2 = 0;
    do
    :: k2 < N -> stopReq[k2] = false; k2++
    :: k2 == N -> break
    od
}
/* Release: resume everyone, or, if requests are queued, keep every CPU but the next requester
 * stopped (hand-over). */
inline release(me) {
    byte k4 = 0;
    q?eval(me); queued[me] = false;
    if
    :: nempty(q) -> byte nxt; q?<nxt>;
       do
       :: k4 < N -> stopReq[k4] = (k4 != nxt); k4++
       :: k4 == N -> break
       od
    :: empty(q) -> clearStops()
    fi
}
inline flush() {
    byte k3 = 0;
    do
    :: k3 < N -> reach[k3] = false; k3++
    :: k3 == N -> break
    od
}

active [N] proctype cpu() {
    byte me = _pid;
    phase[me] = RUNNING;
end:
    do
    /* execute guest code outside the mode (the CPU notices a stop request at the next boundary) */
    :: atomic { phase[me] == RUNNING && pending[me] == 0 && !stopReq[me] -> CHECK }
    /* acknowledge a stop request: halt */
    :: atomic { phase[me] == RUNNING && stopReq[me] -> phase[me] = STOPPED; CHECK }
    /* queue a pending enter-mode request */
    :: atomic { pending[me] > 0 && (phase[me] == RUNNING || phase[me] == STOPPED) && !queued[me] ->
                pending[me]--; q!me; queued[me] = true;
                if :: phase[me] == RUNNING -> phase[me] = WAITING :: else -> skip fi; CHECK }
    /* first in line and the mode is free: take it, ask every other CPU to stop */
    :: atomic { holder == -1 && q?[eval(me)] && (phase[me] == WAITING || (phase[me] == STOPPED && !stopReq[me])) ->
                holder = me; phase[me] = COORD; setStops(me, true); CHECK }
    /* every other CPU stopped: add the region to the view, enter */
#ifdef MAP_BEFORE_STOPPED
    :: atomic { phase[me] == COORD -> visible = true; phase[me] = INMODE; CHECK }
#else
    :: atomic { phase[me] == COORD && OTHERS_STOPPED(me) -> visible = true; phase[me] = INMODE; CHECK }
#endif
    /* run the region's code (the handler runs a while, then returns with RSM) */
    :: atomic { phase[me] == INMODE && !reach[me] -> reach[me] = true; CHECK }
    /* RSM: remove the region and flush, then release and resume the others */
#ifdef RESUME_BEFORE_UNMAP
    :: atomic { phase[me] == INMODE -> clearStops(); phase[me] = LEAVING; CHECK }
    :: atomic { phase[me] == LEAVING -> visible = false; flush(); holder = -1; release(me);
                served++; phase[me] = RUNNING; CHECK }
#else
    :: atomic { phase[me] == INMODE -> visible = false;
#ifndef NO_FLUSH
                flush();
#endif
                phase[me] = LEAVING; CHECK }
    :: atomic { phase[me] == LEAVING -> holder = -1; release(me);
                served++; phase[me] = RUNNING; CHECK }
#endif
    /* resume when no longer asked to stop */
    :: atomic { phase[me] == STOPPED && !stopReq[me] && !queued[me] -> phase[me] = RUNNING; CHECK }
    od
}

/* Enter-mode interrupts for any CPU at any time, R in all. */
active proctype interrupts() {
    byte t;
end:
    do
    :: raised < R -> atomic { select(t : 0 .. N - 1); pending[t]++; raised++ }
    :: raised == R -> break
    od
}

ltl served { <> [] (served == R) }
