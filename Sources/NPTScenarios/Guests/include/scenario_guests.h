/* scenario_guests.h - the CScenarioGuests module, for the scenarios library (Swift): the scenarios'
 * protocol (scenario_protocol.h), the x86-64 guest images' symbols (the NAME_GUEST_* macros of
 * x86-64/NAME_guest.h, made by x86-64/build.sh; the byte arrays left out: Swift would import each as
 * a tuple) and their bytes through scenario_x86_guest. C programs include x86-64/NAME_guest.h. */
#ifndef SCENARIO_GUESTS_H
#define SCENARIO_GUESTS_H
#include <stddef.h>
#include "scenario_protocol.h"
#define GUEST_SYMBOLS_ONLY
#include "../x86-64/hello_guest.h"
#include "../x86-64/hvci_guest.h"
#include "../x86-64/pmem_guest.h"
#include "../x86-64/priv_guest.h"
#include "../x86-64/smp_guest.h"
#undef GUEST_SYMBOLS_ONLY

typedef struct scenario_guest_bytes {
    const unsigned char *bytes;
    size_t length;
} scenario_guest_bytes;

/* The bytes of the array `name` of a header above ("hvci_guest", "priv_guest_region", ...);
 * {NULL, 0} for another name. */
scenario_guest_bytes scenario_x86_guest(const char *name);
#endif
