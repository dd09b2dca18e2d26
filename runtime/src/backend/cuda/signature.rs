//! Kernel parameter lists, read from the kernels' CUDA sources (`moe_kernels::cuda::SOURCES`),
//! so that every launch's argument list is checked against what the kernel declares: the mock
//! device checks each launch, and the driver checks before it passes the list on.
//!
//! Invariants: a parameter is a pointer (any `*`), `unsigned` (32 bits), `unsigned long long`
//! (64 bits) or `float`; a source declaring anything else fails the unit test below, not a
//! launch.

use super::gpu::KArg;

/// One kernel parameter's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    Ptr,
    U32,
    U64,
    F32,
}

/// The parameters of kernel `name`, in order (None: no such kernel, or a parameter of a kind
/// the launch path does not pass).
pub fn of(name: &str) -> Option<Vec<Param>> {
    let src = moe_kernels::cuda::source_of(name)?;
    let text = src.source;
    let mut at = 0;
    while let Some(i) = text[at..].find(name) {
        let start = at + i;
        at = start + name.len();
        let before = text[..start].trim_end();
        let after = text[at..].trim_start();
        // The definition: `extern "C" __global__ void __launch_bounds__(256)` then the name and
        // its parameter list.
        if !(before.ends_with(')') || before.ends_with("void")) || !after.starts_with('(') {
            continue;
        }
        let decl_start = text[..start].rfind("extern \"C\"")?;
        if text[decl_start..start].contains(';') || text[decl_start..start].contains('}') {
            continue;
        }
        let close = after.find(')')?;
        return after[1..close]
            .split(',')
            .map(|p| parse_param(p.trim()))
            .collect();
    }
    None
}

fn parse_param(p: &str) -> Option<Param> {
    if p.contains('*') {
        return Some(Param::Ptr);
    }
    let ty: Vec<&str> = p.split_whitespace().filter(|w| *w != "const").collect();
    match &ty[..ty.len().saturating_sub(1)] {
        ["unsigned"] | ["unsigned", "int"] => Some(Param::U32),
        ["unsigned", "long", "long"] => Some(Param::U64),
        ["float"] => Some(Param::F32),
        _ => None,
    }
}

/// Whether `args` fit `params` in number and kind (the message names the kernel and the first
/// mismatch).
pub fn check_args(kernel: &str, params: &[Param], args: &[KArg]) -> Result<(), String> {
    if params.len() != args.len() {
        return Err(format!(
            "{kernel} takes {} parameters, the launch passed {}",
            params.len(),
            args.len()
        ));
    }
    for (i, (p, a)) in params.iter().zip(args).enumerate() {
        let fits = matches!(
            (p, a),
            (Param::Ptr, KArg::Ptr(_))
                | (Param::U32, KArg::U32(_))
                | (Param::U64, KArg::U64(_))
                | (Param::F32, KArg::F32(_))
        );
        if !fits {
            return Err(format!(
                "{kernel} parameter {i} is {p:?}, the launch passed {a:?}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_has_a_parameter_list_of_known_kinds() {
        for src in moe_kernels::cuda::SOURCES {
            for k in src.kernels {
                let p = of(k).unwrap_or_else(|| panic!("{k}: parameters not understood"));
                assert!(!p.is_empty(), "{k}");
            }
        }
        use Param::*;
        assert_eq!(of("matvec_q8_0").unwrap(), [Ptr, Ptr, Ptr, U32, U32, U32]);
        assert_eq!(of("dequant_q4_k").unwrap(), [Ptr, U64, Ptr]);
        assert_eq!(
            of("attention_decode_bf16").unwrap(),
            [Ptr, Ptr, Ptr, Ptr, U32, U32, U32, U32, F32, U32, Ptr, Ptr, Ptr]
        );
        assert_eq!(of("no_such_kernel"), None);
    }

    #[test]
    fn a_mismatched_argument_list_is_named() {
        let p = of("add_f32").unwrap();
        assert!(check_args("add_f32", &p, &[KArg::Ptr(8), KArg::Ptr(16), KArg::U32(3)]).is_ok());
        let e = check_args("add_f32", &p, &[KArg::Ptr(8), KArg::U32(3)]).unwrap_err();
        assert!(e.contains("takes 3 parameters"), "{e}");
        let e = check_args(
            "add_f32",
            &p,
            &[KArg::Ptr(8), KArg::Ptr(16), KArg::F32(3.0)],
        )
        .unwrap_err();
        assert!(e.contains("parameter 2 is U32"), "{e}");
    }
}
