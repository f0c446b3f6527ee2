/// The release version of both binaries (`--version`) and, by default, of the Debian package
/// (scripts/package-deb.sh reads it from this file). One place: bump it here.
public enum TrellisVersion {
    public static let current = "0.2.0"
}
