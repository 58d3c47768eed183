//! Runs every pgTAP file in sql/tests against a fresh backend and fails on any failed or
//! missing test.

use autocore_stack::postgres::{DATABASE, sql_files};
use autocore_stack::tap::TapReport;
use autocore_stack::{Stack, StackOptions, repo_root};

#[test]
fn every_pgtap_file_passes_against_a_fresh_backend() {
    let stack = Stack::start(StackOptions::backend_only()).expect("stack starts");
    let pg = stack.postgres().unwrap();
    pg.psql(
        DATABASE,
        &[
            "-c",
            "create extension if not exists pgtap schema extensions",
        ],
    )
    .expect("pgTAP is installed (postgresql-15-pgtap)");

    let files = sql_files(&repo_root().join("sql/tests")).unwrap();
    assert!(
        files.len() >= 6,
        "expected the pgTAP suite, found {files:?}"
    );
    let mut problems = Vec::new();
    let mut total = 0;
    for file in &files {
        let (ok, stdout, stderr) = pg.psql_file_output(file).unwrap();
        let report = TapReport::parse(&stdout);
        total += report.passed;
        let name = file.file_name().unwrap().to_string_lossy();
        if !ok || !report.is_success() {
            problems.push(format!(
                "{name}: planned {:?}, ran {}, failures:\n{}\nstderr: {stderr}",
                report.planned,
                report.ran(),
                report.failures.join("\n")
            ));
        } else {
            eprintln!("pgTAP {name}: {} tests ok", report.passed);
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    eprintln!("pgTAP: {total} tests in {} files passed", files.len());
}
