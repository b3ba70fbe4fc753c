/* Runs on tests/workloads/fake_libc.c's libc.so alone (-nostdlib): waits in pause(2). */
void fake_pause(void);
void _start(void) { fake_pause(); }
