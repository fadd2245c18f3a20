//! Config values that are one of a fixed set of words (`cluster.role`,
//! `log.format`): typed enums for the code, lenient for the parser.
//!
//! A word outside the set deserializes to `Invalid` instead of failing the
//! parse, so that validation reports it together with every other problem in
//! the file, and the rest of the code never compares strings.

macro_rules! words {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
            /// Not one of the words; validation reports it.
            Invalid(String),
        }

        impl $name {
            pub const WORDS: &'static [&'static str] = &[$($word),+];

            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $word,)+
                    $name::Invalid(s) => s,
                }
            }

            /// The validation message for an invalid word, if this is one.
            pub fn problem(&self) -> Option<String> {
                match self {
                    $name::Invalid(s) => Some(format!(
                        "{s:?}: expected {}",
                        $name::WORDS.iter().map(|w| format!("{w:?}")).collect::<Vec<_>>().join(" or ")
                    )),
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Ok(match s.as_str() {
                    $($word => $name::$variant,)+
                    _ => $name::Invalid(s),
                })
            }
        }
    };
}

pub(crate) use words;
