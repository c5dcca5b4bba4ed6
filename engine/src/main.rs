use std::process::ExitCode;

fn main() -> ExitCode {
    whet_engine::host::keep_freed_memory();
    whet_engine::host::on_one_thread_pool(|| {
        whet_engine::cli::run(whet_engine::cli::Cli::parse_env())
    })
}
