// vcsim for revive's tests: govmomi's vSphere simulator (the `simulator`
// package Debian ships in golang-github-vmware-govmomi-dev) behind a small
// command, because Debian does not ship govmomi's own vcsim command.
//
// It serves HTTPS with a certificate signed by a CA it generates, so tests
// can keep certificate checking on (revive's default) by trusting that CA.
// It prints one line `VCSIM_URL=https://host:port/sdk` once it accepts
// connections, then runs until SIGINT or SIGTERM.
package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"encoding/xml"
	"flag"
	"fmt"
	"io/ioutil"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

func main() {
	esx := flag.Bool("esx", false, "simulate a standalone ESXi host (default: vCenter)")
	listen := flag.String("l", "127.0.0.1:0", "listen address (port 0 picks a free port)")
	user := flag.String("username", "user", "login user name")
	pass := flag.String("password", "pass", "login password")
	nfsQueryFile := flag.String("nfs-query-file", "", "file holding libnfs URL options (nfsport=N&mountport=M) of the NFS server behind NAS datastores: when set, RegisterVM first copies the VM folder's small files over NFS (libnfs nfs-cp) into the datastore's localPath, as ESXi would read them over NFS")
	tlsDir := flag.String("tls-dir", "", "folder for ca.pem, server.pem and server.key: reused when present (a restarted vcsim keeps its certificate), made otherwise")
	flag.Parse()

	model := simulator.VPX()
	if *esx {
		model = simulator.ESX()
	}
	if err := model.Create(); err != nil {
		log.Fatalf("create model: %v", err)
	}
	defer model.Remove()

	simulator.Map.AddHandler(&relocateFix{})

	// vcsim's own listener runs plain HTTP on a free port and stays unused:
	// we serve its handlers on our TLS listener, with the NFS fetch in front.
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(*user, *pass)}
	cert, err := serverCertificate(*tlsDir)
	if err != nil {
		log.Fatalf("certificates: %v", err)
	}
	server := model.Service.NewServer()
	defer server.Close()

	var handler http.Handler = model.Service.ServeMux
	if *nfsQueryFile != "" {
		handler = &nfsFetch{next: handler, queryFile: *nfsQueryFile}
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("listen %s: %v", *listen, err)
	}
	front := &http.Server{Handler: handler}
	go func() {
		_ = front.Serve(tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}}))
	}()
	defer front.Close()
	u := url.URL{Scheme: "https", Host: ln.Addr().String(), Path: "/sdk"}
	fmt.Printf("VCSIM_URL=%s\n", u.String())
	os.Stdout.Sync()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
}

// nfsFetch stands in for ESXi's NFS client: vcsim reads a NAS datastore's
// files from its localPath folder, so before a RegisterVM_Task reaches vcsim
// it copies the VM folder's small files (not the disks) from the NFS server
// into that folder with libnfs' nfs-cp. vcsim also wants the NVRAM named
// after the VM being registered: a copy under that name too.
type nfsFetch struct {
	next      http.Handler
	queryFile string
}

func (f *nfsFetch) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost {
		body, err := ioutil.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = ioutil.NopCloser(bytes.NewReader(body))
		if bytes.Contains(body, []byte("RegisterVM_Task")) {
			var req struct {
				Path string `xml:"Body>RegisterVM_Task>path"`
				Name string `xml:"Body>RegisterVM_Task>name"`
			}
			if xml.Unmarshal(body, &req) == nil && req.Path != "" {
				if err := f.fetch(req.Path, req.Name); err != nil {
					log.Printf("nfs fetch for %s: %v", req.Path, err)
				}
			}
		}
	}
	f.next.ServeHTTP(w, r)
}

func (f *nfsFetch) fetch(dsPath, vmName string) error {
	end := strings.Index(dsPath, "]")
	if !strings.HasPrefix(dsPath, "[") || end < 0 {
		return fmt.Errorf("not a datastore path")
	}
	dsName := dsPath[1:end]
	folder := path.Dir(strings.TrimSpace(dsPath[end+1:]))
	var info *types.NasDatastoreInfo
	for _, e := range simulator.Map.All("Datastore") {
		if ds, ok := e.(*simulator.Datastore); ok && ds.Name == dsName {
			info, _ = ds.Info.(*types.NasDatastoreInfo)
		}
	}
	if info == nil || info.Nas == nil {
		return nil // not a NAS datastore: nothing to fetch
	}
	query, err := ioutil.ReadFile(f.queryFile)
	if err != nil {
		return err
	}
	q := strings.TrimSpace(string(query))
	local := filepath.Join(info.Url, folder)
	if err := os.MkdirAll(local, 0o755); err != nil {
		return err
	}
	base := fmt.Sprintf("nfs://%s%s/%s", info.Nas.RemoteHost, strings.TrimRight(info.Nas.RemotePath, "/"), folder)
	out, err := exec.Command("nfs-ls", base+"?"+q).CombinedOutput()
	if err != nil {
		return fmt.Errorf("nfs-ls %s: %v: %s", base, err, out)
	}
	nvram := ""
	for _, line := range strings.Split(string(out), "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 || !strings.HasPrefix(fields[0], "-") {
			continue
		}
		name := fields[len(fields)-1]
		if strings.HasSuffix(name, "-flat.vmdk") || strings.HasSuffix(name, "-delta.vmdk") ||
			strings.HasSuffix(name, "-sesparse.vmdk") || strings.HasSuffix(name, ".vswp") {
			continue
		}
		dest := filepath.Join(local, name)
		if cp, err := exec.Command("nfs-cp", base+"/"+name+"?"+q, dest).CombinedOutput(); err != nil {
			return fmt.Errorf("nfs-cp %s: %v: %s", name, err, cp)
		}
		if strings.HasSuffix(name, ".nvram") {
			nvram = dest
		}
	}
	if nvram != "" && vmName != "" {
		want := filepath.Join(local, vmName+".nvram")
		if _, err := os.Stat(want); os.IsNotExist(err) {
			data, err := ioutil.ReadFile(nvram)
			if err != nil {
				return err
			}
			return ioutil.WriteFile(want, data, 0o644)
		}
	}
	return nil
}

// relocateFix corrects a vcsim bug (govmomi 0.24) that real ESXi does not
// have: RelocateVM_Task updates the VM's datastore list but leaves the VM in
// the source datastore's list of VMs, so the source can never be removed
// ("ResourceInUse") after a Storage vMotion. It watches VM datastore changes
// and removes the VM from datastores it no longer uses.
type relocateFix struct{}

func (*relocateFix) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "ReviveRelocateFix", Value: "revive-relocate-fix"}
}

func (*relocateFix) PutObject(mo.Reference) {}

func (*relocateFix) RemoveObject(types.ManagedObjectReference) {}

func (*relocateFix) UpdateObject(obj mo.Reference, changes []types.PropertyChange) {
	touched := false
	for _, c := range changes {
		if c.Name == "datastore" {
			touched = true
		}
	}
	ref := obj.Reference()
	if !touched || ref.Type != "VirtualMachine" {
		return
	}
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	uses := map[types.ManagedObjectReference]bool{}
	for _, d := range vm.Datastore {
		uses[d] = true
	}
	for _, e := range simulator.Map.All("Datastore") {
		ds, ok := e.(*simulator.Datastore)
		if !ok || uses[ds.Self] {
			continue
		}
		for _, v := range ds.Vm {
			if v == ref {
				simulator.Map.RemoveReference(ds, &ds.Vm, ref)
				break
			}
		}
	}
}

// serverCertificate loads the server certificate from dir, or makes one (and
// its CA) and saves both there. Without dir the certificates are not saved.
func serverCertificate(dir string) (tls.Certificate, error) {
	if dir != "" {
		if cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key")); err == nil {
			return cert, nil
		}
	}
	cert, caPEM, err := certificates()
	if err != nil || dir == "" {
		return cert, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		return cert, err
	}
	files := map[string][]byte{
		"ca.pem":     caPEM,
		"server.pem": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}),
		"server.key": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}
	for name, data := range files {
		if err := ioutil.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return cert, err
		}
	}
	return cert, nil
}

// certificates makes a CA and a server certificate it signs for 127.0.0.1,
// ::1 and localhost. A separate CA because Go's built-in test certificate is
// a CA certificate used as a leaf, which rustls (correctly) refuses.
func certificates() (tls.Certificate, []byte, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "revive test vcsim CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	return cert, caPEM, nil
}
