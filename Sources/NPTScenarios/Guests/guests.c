/* The x86-64 guest images' bytes for the scenarios library. The headers come first, with their
 * arrays: scenario_guests.h includes them again (their guards skip them) for the declaration. */
#include <string.h>
#include "x86-64/hello_guest.h"
#include "x86-64/hvci_guest.h"
#include "x86-64/pmem_guest.h"
#include "x86-64/priv_guest.h"
#include "x86-64/smp_guest.h"
#include "include/scenario_guests.h"

#define GUEST(array) {#array, {array, sizeof array}}
static const struct {
    const char *name;
    scenario_guest_bytes bytes;
} guests[] = {
    GUEST(hello_guest), GUEST(hvci_guest), GUEST(pmem_guest), GUEST(priv_guest), GUEST(priv_guest_region),
    GUEST(smp_guest),
};

scenario_guest_bytes scenario_x86_guest(const char *name) {
    for (size_t i = 0; i < sizeof guests / sizeof guests[0]; i++) {
        if (strcmp(guests[i].name, name) == 0) return guests[i].bytes;
    }
    return (scenario_guest_bytes){NULL, 0};
}
