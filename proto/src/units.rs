//! The one grammar for sizes that admins, maintainers and users write: in a site policy, a
//! repository's `.github/testbot.toml`, and on the `testbot run` command line.

/// Parses a memory size the way Slurm writes it: `512M`, `64G`, `1T` (powers of 1024; `MB`,
/// `MiB`, `GB`, `GiB`, `TB`, `TiB` too), or a bare number of MiB. Returns MiB.
pub fn parse_memory_mib(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let bad = || {
        format!(
            "{text:?} is not a memory size; write e.g. \"512M\", \"64G\" or \"1T\" (powers of 1024)"
        )
    };
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" => 1024 * 1024,
        _ => return Err(bad()),
    };
    let mib = number.checked_mul(factor).ok_or_else(bad)?;
    if mib == 0 {
        return Err(format!(
            "{text:?} is zero; the smallest memory size is \"1M\""
        ));
    }
    Ok(mib)
}

/// MiB as an admin writes them: `64G` when a whole number of GiB, else `512M`.
pub fn format_mib(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{}G", mib / 1024)
    } else {
        format!("{mib}M")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_read_as_slurm_writes_them() {
        assert_eq!(parse_memory_mib("512"), Ok(512));
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("4G"), Ok(4096));
        assert_eq!(parse_memory_mib("4GiB"), Ok(4096));
        assert_eq!(parse_memory_mib("1T"), Ok(1024 * 1024));
        assert!(parse_memory_mib("0").unwrap_err().contains("zero"));
        assert!(
            parse_memory_mib("4X")
                .unwrap_err()
                .contains("not a memory size")
        );
        assert_eq!(format_mib(4096), "4G");
        assert_eq!(format_mib(1536), "1536M");
    }
}
