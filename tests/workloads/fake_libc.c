/* A C library (soname libc.so, as musl's) without the malloc family: what a process whose
 * libc pyleak cannot probe looks like. Built with -nostdlib (tests/tests/bad_input.rs). */
void fake_pause(void) {
    for (;;) __asm__ volatile("mov $34, %%eax\n\tsyscall" ::: "rax", "rcx", "r11", "memory");
}
