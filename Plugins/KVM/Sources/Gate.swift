// The layout gate is gone. Memslots belong to a KVM VM, so while all hierarchies shared one VM a vCPU
// could enter KVM_RUN only while its hierarchy's layout was installed, and vCPUs of different
// hierarchies took turns (each turn a layout switch and a cross-thread wake-up). Each layout now has
// a KVM VM of its own (a view, Views.swift): vCPUs in different hierarchies run at the same time and
// nobody waits. The gate's statistics export stays for the tools that look it up: it reports no
// waits, no kicks, no wait time.
import Synchronization

/// Entries into KVM_RUN that had to wait at the layout gate, vCPUs the gate kicked, the total wait
/// time (ns): always 0 (there is no gate; views run concurrently).
@_cdecl("npt_kvm_gate_stats")
public func npt_kvm_gate_stats(_ waits: UnsafeMutablePointer<UInt64>?, _ kicks: UnsafeMutablePointer<UInt64>?,
                               _ waitNanos: UnsafeMutablePointer<UInt64>?) {
    waits?.pointee = 0
    kicks?.pointee = 0
    waitNanos?.pointee = 0
}
