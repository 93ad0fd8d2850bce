"""Each stage's report: `write(...)` turns a finished run's metrics and results into
`<workdir>/report.md` with its PNG plots (through the primitives of `gptstack.report`)."""
