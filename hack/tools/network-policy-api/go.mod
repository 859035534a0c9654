// Pins the ClusterNetworkPolicy API whose CRD the test bed installs and the
// chart can install (hack/fetch-cnp-crd.sh copies it from this module).
module netfence.dev/hack/tools/network-policy-api

go 1.25

require sigs.k8s.io/network-policy-api v0.3.0
