//! pyleak: find memory leaks in running Python programs from the outside.

fn main() {
    pyleak::main()
}
