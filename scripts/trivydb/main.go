// trivydb writes a vulnerability database in Trivy's own format (trivy-db schema 2) from a
// JSON list of advisories, for machines that cannot download Trivy's published one:
//
//	trivydb -cache <trivy cache dir> [advisories.json]   (no file: an empty database)
//
// It writes <cache>/db/trivy.db (BoltDB) and <cache>/db/metadata.json, the layout Trivy
// opens with --skip-db-update. The buckets are trivy-db's (github.com/aquasecurity/trivy-db,
// pkg/db):
//
//	"<source>" (e.g. "debian 12") → <package> (Debian: the source package) → <vuln id> → advisory
//	"vulnerability"              → <vuln id> → {Title, Description, Severity, VendorSeverity, CVSS}
//	"data-source"                → "<source>" → {ID, Name, URL}
//
// An advisory in the input:
//
//	{"id": "CVE-2099-0001", "source": "debian 12", "package": "zlib",
//	 "fixed_version": "1:1.3-1", "title": "...", "severity": "CRITICAL",
//	 "cvss": {"nvd": {"V3Score": 9.8, "V3Vector": "CVSS:3.1/AV:N/AC:L/..."}}}
//
// The database is written to a temporary file and renamed into place, so a scan running
// meanwhile sees the old database or the new one, never half of one.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// SchemaVersion is trivy-db's: Trivy refuses a database of another schema.
const SchemaVersion = 2

type CVSS struct {
	V2Vector string  `json:"V2Vector,omitempty"`
	V3Vector string  `json:"V3Vector,omitempty"`
	V2Score  float64 `json:"V2Score,omitempty"`
	V3Score  float64 `json:"V3Score,omitempty"`
}

type Advisory struct {
	ID           string          `json:"id"`
	Source       string          `json:"source"`
	Package      string          `json:"package"`
	FixedVersion string          `json:"fixed_version"`
	Title        string          `json:"title"`
	Description  string          `json:"description"`
	Severity     string          `json:"severity"`
	CVSS         map[string]CVSS `json:"cvss"`
}

// trivy-db's types.Severity: the order of these names.
var severities = []string{"UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL"}

// Data sources Trivy names in its report, by the bucket's distribution family.
var dataSources = map[string][3]string{
	"debian": {"debian", "Debian Security Tracker",
		"https://salsa.debian.org/security-tracker-team/security-tracker"},
	"alpine": {"alpine", "Alpine Secdb", "https://secdb.alpinelinux.org/"},
	"ubuntu": {"ubuntu", "Ubuntu CVE Tracker", "https://git.launchpad.net/ubuntu-cve-tracker"},
}

func severityNumber(name string) (int, error) {
	if name == "" {
		return 0, nil
	}
	for i, s := range severities {
		if strings.EqualFold(s, name) {
			return i, nil
		}
	}
	return 0, fmt.Errorf("unknown severity %q (one of %v)", name, severities)
}

func put(b *bolt.Bucket, key string, value any) error {
	data, err := json.Marshal(value)
	if err != nil {
		return err
	}
	return b.Put([]byte(key), data)
}

func write(path string, advisories []Advisory) error {
	db, err := bolt.Open(path, 0o644, &bolt.Options{Timeout: 10 * time.Second})
	if err != nil {
		return err
	}
	defer db.Close()
	return db.Update(func(tx *bolt.Tx) error {
		vulns, err := tx.CreateBucketIfNotExists([]byte("vulnerability"))
		if err != nil {
			return err
		}
		sources, err := tx.CreateBucketIfNotExists([]byte("data-source"))
		if err != nil {
			return err
		}
		for i, a := range advisories {
			if a.ID == "" || a.Source == "" || a.Package == "" {
				return fmt.Errorf("advisory %d: id, source and package are required", i)
			}
			severity, err := severityNumber(a.Severity)
			if err != nil {
				return fmt.Errorf("advisory %s: %w", a.ID, err)
			}
			root, err := tx.CreateBucketIfNotExists([]byte(a.Source))
			if err != nil {
				return err
			}
			pkg, err := root.CreateBucketIfNotExists([]byte(a.Package))
			if err != nil {
				return err
			}
			advisory := map[string]any{}
			if a.FixedVersion != "" {
				advisory["FixedVersion"] = a.FixedVersion
			}
			if err := put(pkg, a.ID, advisory); err != nil {
				return err
			}
			family := strings.Fields(a.Source)[0]
			detail := map[string]any{"Title": a.Title, "Description": a.Description,
				"Severity": severities[severity]}
			if len(a.CVSS) > 0 {
				detail["CVSS"] = a.CVSS
				vendor := map[string]int{}
				for source := range a.CVSS {
					vendor[source] = severity
				}
				vendor[family] = severity
				detail["VendorSeverity"] = vendor
			}
			if err := put(vulns, a.ID, detail); err != nil {
				return err
			}
			if ds, ok := dataSources[family]; ok {
				err := put(sources, a.Source, map[string]string{"ID": ds[0], "Name": ds[1], "URL": ds[2]})
				if err != nil {
					return err
				}
			}
		}
		return nil
	})
}

func run() error {
	cache := flag.String("cache", "", "Trivy's cache folder (the database goes to <cache>/db/)")
	flag.Parse()
	if *cache == "" || flag.NArg() > 1 {
		return fmt.Errorf("usage: trivydb -cache DIR [advisories.json]")
	}
	var advisories []Advisory
	if flag.NArg() == 1 {
		data, err := os.ReadFile(flag.Arg(0))
		if err != nil {
			return err
		}
		if err := json.Unmarshal(data, &advisories); err != nil {
			return fmt.Errorf("%s: %w", flag.Arg(0), err)
		}
	}
	dir := filepath.Join(*cache, "db")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, ".trivy.db-*")
	if err != nil {
		return err
	}
	tmp.Close()
	defer os.Remove(tmp.Name())
	if err := write(tmp.Name(), advisories); err != nil {
		return err
	}
	now := time.Now().UTC()
	metadata, err := json.Marshal(map[string]any{
		"Version":      SchemaVersion,
		"NextUpdate":   now.Add(100 * 365 * 24 * time.Hour), // never stale: nothing updates it
		"UpdatedAt":    now,
		"DownloadedAt": now,
	})
	if err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, "trivy.db")); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "metadata.json"), metadata, 0o644)
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "trivydb:", err)
		os.Exit(1)
	}
}
