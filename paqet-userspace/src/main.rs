fn main() {
    println!("paqet-dp {}", env!("CARGO_PKG_VERSION"));
}
