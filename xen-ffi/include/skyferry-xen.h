/*
 * Everything skyferry takes from Xen's C libraries, in one header: the input of bindgen
 * (src/bindings/) and of the test double (double/), so both see the same declarations.
 */
#ifndef SKYFERRY_XEN_H
#define SKYFERRY_XEN_H

#include <xenctrl.h>
#include <xenforeignmemory.h>

/*
 * Page types of a batch of guest frames: XEN_DOMCTL_getpageframeinfo3, which tells RAM from
 * holes (XEN_DOMCTL_PFINFO_XTAB) the way Xen's own save code does (xg_sr_save.c). libxenctrl
 * 4.17 exports it (symbol version VERS_4.17.0) but declares it only in its private
 * tools/libs/ctrl/xc_private.h, so it is declared here, with the same prototype.
 */
int xc_get_pfn_type_batch(xc_interface *xch, uint32_t dom, unsigned int num, xen_pfn_t *arr);

#endif
