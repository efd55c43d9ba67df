/*
 * plugin_no_entry.c - a well-formed shared library that is not an NPTKit plugin: it exports a
 * function, but not npt_plugin_entry. npt_plugin_load must answer NPT_ERR_PLUGIN.
 */
__attribute__((visibility("default")))
int not_a_plugin_entry(void) { return 42; }
