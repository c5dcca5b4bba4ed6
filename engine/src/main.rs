fn main() {
    println!("whet");
}
