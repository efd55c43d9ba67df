// Exit reason names as the kvm_exit tracepoint prints them (arch/x86/include/uapi/asm/vmx.h
// VMX_EXIT_REASONS and svm.h SVM_EXIT_REASONS; the list this machine's kernel 6.18 prints, read
// from /sys/kernel/tracing/events/kvm/kvm_exit/format). VMX names are upper case, SVM names lower
// case, so a name says which ISA printed it.

package enum KVMISA: String, Sendable, Hashable { case vmx, svm }

enum KVMExitReasons {
    static let vmx: [String: UInt32] = [
        "EXCEPTION_NMI": 0, "EXTERNAL_INTERRUPT": 1, "TRIPLE_FAULT": 2, "INIT_SIGNAL": 3, "SIPI_SIGNAL": 4,
        "INTERRUPT_WINDOW": 7, "NMI_WINDOW": 8, "TASK_SWITCH": 9, "CPUID": 10, "HLT": 12, "INVD": 13, "INVLPG": 14,
        "RDPMC": 15, "RDTSC": 16, "VMCALL": 18, "VMCLEAR": 19, "VMLAUNCH": 20, "VMPTRLD": 21, "VMPTRST": 22,
        "VMREAD": 23, "VMRESUME": 24, "VMWRITE": 25, "VMOFF": 26, "VMON": 27, "CR_ACCESS": 28, "DR_ACCESS": 29,
        "IO_INSTRUCTION": 30, "MSR_READ": 31, "MSR_WRITE": 32, "INVALID_STATE": 33, "MSR_LOAD_FAIL": 34,
        "MWAIT_INSTRUCTION": 36, "MONITOR_TRAP_FLAG": 37, "MONITOR_INSTRUCTION": 39, "PAUSE_INSTRUCTION": 40,
        "MCE_DURING_VMENTRY": 41, "TPR_BELOW_THRESHOLD": 43, "APIC_ACCESS": 44, "EOI_INDUCED": 45, "GDTR_IDTR": 46,
        "LDTR_TR": 47, "EPT_VIOLATION": 48, "EPT_MISCONFIG": 49, "INVEPT": 50, "RDTSCP": 51, "PREEMPTION_TIMER": 52,
        "INVVPID": 53, "WBINVD": 54, "XSETBV": 55, "APIC_WRITE": 56, "RDRAND": 57, "INVPCID": 58, "VMFUNC": 59,
        "ENCLS": 60, "RDSEED": 61, "PML_FULL": 62, "XSAVES": 63, "XRSTORS": 64, "UMWAIT": 67, "TPAUSE": 68,
        "BUS_LOCK": 74, "NOTIFY": 75, "TDCALL": 77, "MSR_READ_IMM": 84, "MSR_WRITE_IMM": 85,
    ]
    static let svm: [String: UInt32] = {
        var m: [String: UInt32] = [
            "read_cr0": 0x000, "read_cr2": 0x002, "read_cr3": 0x003, "read_cr4": 0x004, "read_cr8": 0x008,
            "write_cr0": 0x010, "write_cr2": 0x012, "write_cr3": 0x013, "write_cr4": 0x014, "write_cr8": 0x018,
            "interrupt": 0x060, "nmi": 0x061, "smi": 0x062, "init": 0x063, "vintr": 0x064, "cr0_sel_write": 0x065,
            "read_idtr": 0x066, "read_gdtr": 0x067, "read_ldtr": 0x068, "read_rt": 0x069, "write_idtr": 0x06a,
            "write_gdtr": 0x06b, "write_ldtr": 0x06c, "write_rt": 0x06d, "rdtsc": 0x06e, "rdpmc": 0x06f,
            "pushf": 0x070, "popf": 0x071, "cpuid": 0x072, "rsm": 0x073, "iret": 0x074, "swint": 0x075,
            "invd": 0x076, "pause": 0x077, "hlt": 0x078, "invlpg": 0x079, "invlpga": 0x07a, "io": 0x07b,
            "msr": 0x07c, "task_switch": 0x07d, "ferr_freeze": 0x07e, "shutdown": 0x07f, "vmrun": 0x080,
            "hypercall": 0x081, "vmload": 0x082, "vmsave": 0x083, "stgi": 0x084, "clgi": 0x085, "skinit": 0x086,
            "rdtscp": 0x087, "icebp": 0x088, "wbinvd": 0x089, "monitor": 0x08a, "mwait": 0x08b, "xsetbv": 0x08d,
            "write_efer_trap": 0x08f, "write_cr0_trap": 0x090, "write_cr4_trap": 0x094, "write_cr8_trap": 0x098,
            "invpcid": 0x0a2, "buslock": 0x0a5, "idle-halt": 0x0a6, "npf": 0x400, "avic_incomplete_ipi": 0x401,
            "avic_unaccelerated_access": 0x402, "vmgexit": 0x403,
        ]
        for i in 0..<8 { m["read_dr\(i)"] = 0x020 + UInt32(i); m["write_dr\(i)"] = 0x030 + UInt32(i) }
        let exc: [(String, UInt32)] = [("DE", 0), ("DB", 1), ("BP", 3), ("OF", 4), ("BR", 5), ("UD", 6), ("NM", 7),
                                       ("DF", 8), ("TS", 10), ("NP", 11), ("SS", 12), ("GP", 13), ("PF", 14),
                                       ("MF", 16), ("AC", 17), ("MC", 18), ("XF", 19)]
        for (n, v) in exc { m["\(n) excp"] = 0x040 + v }
        return m
    }()

    /// The VMX basic exit reason of an EPT violation, and SVM's nested page fault.
    static let vmxEPTViolation: UInt32 = 48
    static let svmNPF: UInt32 = 0x400
}

/// Exception mnemonics of kvm_inj_exception ("#PF" = 14).
enum KVMExceptions {
    static let vectors: [String: UInt32] = ["DE": 0, "DB": 1, "BP": 3, "OF": 4, "BR": 5, "UD": 6, "NM": 7, "DF": 8,
                                            "TS": 10, "NP": 11, "SS": 12, "GP": 13, "PF": 14, "MF": 16, "AC": 17,
                                            "MC": 18, "XM": 19, "VE": 20, "CP": 21, "HV": 28, "VC": 29, "SX": 30]
}

/// KVM_EXIT_* (include/uapi/linux/kvm.h), as kvm_userspace_exit names them.
enum KVMUserspaceReasons {
    static let names = ["UNKNOWN", "EXCEPTION", "IO", "HYPERCALL", "DEBUG", "HLT", "MMIO", "IRQ_WINDOW_OPEN", "SHUTDOWN",
                        "FAIL_ENTRY", "INTR", "SET_TPR", "TPR_ACCESS", "S390_SIEIC", "S390_RESET", "DCR", "NMI",
                        "INTERNAL_ERROR", "OSI", "PAPR_HCALL", "S390_UCONTROL", "WATCHDOG", "S390_TSCH", "EPR",
                        "SYSTEM_EVENT", "S390_STSI", "IOAPIC_EOI", "HYPERV", "ARM_NISV", "X86_RDMSR", "X86_WRMSR",
                        "DIRTY_RING_FULL", "AP_RESET_HOLD", "X86_BUS_LOCK", "XEN", "RISCV_SBI", "RISCV_CSR", "NOTIFY",
                        "LOONGARCH_IOCSR", "MEMORY_FAULT"]
}
