{{/* Names ---------------------------------------------------------------- */}}

{{- define "netfence.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object; short enough for "<fullname>-etcd-headless" and pod names. */}}
{{- define "netfence.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "netfence.controller.fullname" -}}{{ include "netfence.fullname" . }}-controller{{- end -}}
{{- define "netfence.agent.fullname" -}}{{ include "netfence.fullname" . }}-agent{{- end -}}
{{- define "netfence.etcd.fullname" -}}{{ include "netfence.fullname" . }}-etcd{{- end -}}
{{- define "netfence.etcd.headless" -}}{{ include "netfence.fullname" . }}-etcd-headless{{- end -}}
{{- define "netfence.test.fullname" -}}{{ include "netfence.fullname" . }}-test{{- end -}}

{{/* Labels ---------------------------------------------------------------- */}}

{{- define "netfence.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels; call with (dict "ctx" $ "component" "controller"). Never change: selectors are immutable. */}}
{{- define "netfence.selectorLabels" -}}
app.kubernetes.io/name: {{ include "netfence.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "netfence.labels" -}}
{{ include "netfence.selectorLabels" . }}
app.kubernetes.io/part-of: netfence
app.kubernetes.io/version: {{ include "netfence.version" . | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "netfence.chart" .ctx }}
{{- end -}}

{{/* Images ---------------------------------------------------------------- */}}

{{/*
Call with (dict "ctx" $ "image" .Values.controller.image): repository@digest
when a digest is set, else repository:tag (the tag defaults to the appVersion).
*/}}
{{- define "netfence.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
app.kubernetes.io/version of a component's objects: the tag of the image it
runs (controller, agent, etcd; the helm test runs the controller image), else
the chart's appVersion; cut to a valid label value.
*/}}
{{- define "netfence.version" -}}
{{- $v := .ctx.Values -}}
{{- $images := dict "controller" $v.controller.image "test" $v.controller.image "agent" $v.agent.image "etcd" $v.etcd.image -}}
{{- $image := get $images .component | default dict -}}
{{- $tag := default .ctx.Chart.AppVersion $image.tag -}}
{{- $label := regexReplaceAll "[^A-Za-z0-9_.-]" $tag "_" | trunc 63 -}}
{{- regexReplaceAll "[-_.]+$" $label "" -}}
{{- end -}}

{{/* etcd ------------------------------------------------------------------ */}}

{{- define "netfence.etcd.clientHost" -}}
{{ include "netfence.etcd.fullname" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end -}}

{{/* host:port list the controller and the agents dial (TLS: the CA is always passed). */}}
{{- define "netfence.etcd.endpoints" -}}
{{- if .Values.etcd.external.enabled -}}
{{- $eps := list -}}
{{- range .Values.etcd.external.endpoints -}}
{{- $eps = append $eps (trimPrefix "https://" .) -}}
{{- end -}}
{{- join "," $eps -}}
{{- else -}}
{{- include "netfence.etcd.clientHost" . }}:2379
{{- end -}}
{{- end -}}

{{/* The Secret with ca.crt, tls.crt and tls.key the controller and the agents use. */}}
{{- define "netfence.etcd.clientSecret" -}}
{{- if .Values.etcd.external.enabled -}}
{{- .Values.etcd.external.secretName -}}
{{- else -}}
{{- if eq (include "netfence.etcd.tlsMethod" .) "existingSecret" -}}
{{- .Values.etcd.tls.existingClientSecret -}}
{{- else -}}
{{- printf "%s-client-tls" (include "netfence.etcd.fullname" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "netfence.etcd.serverSecret" -}}
{{- if eq (include "netfence.etcd.tlsMethod" .) "existingSecret" -}}
{{- .Values.etcd.tls.existingSecret -}}
{{- else -}}
{{- printf "%s-server-tls" (include "netfence.etcd.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
Where the bundled etcd's certificates come from: helm, certManager or
existingSecret. Values of an older release upgraded with --reuse-values have
no method: existingSecret when its Secrets are named, else helm.
*/}}
{{- define "netfence.etcd.tlsMethod" -}}
{{- $tls := .Values.etcd.tls -}}
{{- if $tls.method -}}
{{- $tls.method -}}
{{- else if $tls.existingSecret -}}
existingSecret
{{- else -}}
helm
{{- end -}}
{{- end -}}

{{/* Flags shared by the controller and the agent. */}}
{{- define "netfence.etcd.args" -}}
- --etcd-endpoints={{ include "netfence.etcd.endpoints" . }}
- --etcd-prefix={{ .Values.etcd.prefix }}
- --etcd-ca=/etc/netfence/etcd/ca.crt
- --etcd-cert=/etc/netfence/etcd/tls.crt
- --etcd-key=/etc/netfence/etcd/tls.key
{{- end -}}

{{/* The client certificate volume; mode 0440 (288): root (agent) and fsGroup (controller) read it. */}}
{{- define "netfence.etcd.clientVolume" -}}
- name: etcd-client-tls
  secret:
    secretName: {{ include "netfence.etcd.clientSecret" . }}
    defaultMode: 288
{{- end -}}

{{- define "netfence.etcd.clientVolumeMount" -}}
- name: etcd-client-tls
  mountPath: /etc/netfence/etcd
  readOnly: true
{{- end -}}

{{/* Pod annotation that changes when the chart-generated client certificate changes, to roll the pods. */}}
{{- define "netfence.etcd.clientChecksum" -}}
{{- if include "netfence.etcd.generateTLS" . -}}
{{- include "netfence.etcd.tls" . -}}
checksum/etcd-client-tls: {{ toJson .Values._netfenceEtcdTLS.client | sha256sum }}
{{- end -}}
{{- end -}}

{{/*
The bundled etcd's certificates, computed once per render and memoized in
.Values._netfenceEtcdTLS: the Secrets from the cluster when both exist
(`lookup`, so upgrades keep them), else a new CA, a server/peer certificate and
a client certificate (genCA/genSignedCert). Returns nothing; read
.Values._netfenceEtcdTLS.server / .client (maps of base64 data).
*/}}
{{- define "netfence.etcd.tls" -}}
{{- if not (hasKey .Values "_netfenceEtcdTLS") -}}
{{- $ns := .Release.Namespace -}}
{{- $full := include "netfence.etcd.fullname" . -}}
{{- $server := (lookup "v1" "Secret" $ns (printf "%s-server-tls" $full)) | default dict -}}
{{- $client := (lookup "v1" "Secret" $ns (printf "%s-client-tls" $full)) | default dict -}}
{{- $tls := dict -}}
{{- if and (index ($server.data | default dict) "tls.crt") (index ($client.data | default dict) "tls.crt") -}}
{{- $_ := set $tls "server" $server.data -}}
{{- $_ := set $tls "client" $client.data -}}
{{- else -}}
{{- $days := int .Values.etcd.tls.validityDays -}}
{{- $ca := genCA (printf "%s-ca" $full) $days -}}
{{- $dns := include "netfence.etcd.dnsNames" . | fromJsonArray -}}
{{- $srv := genSignedCert $full (list "127.0.0.1") $dns $days $ca -}}
{{- $cli := genSignedCert "netfence-client" nil nil $days $ca -}}
{{- $_ := set $tls "server" (dict "ca.crt" (b64enc $ca.Cert) "tls.crt" (b64enc $srv.Cert) "tls.key" (b64enc $srv.Key)) -}}
{{- $_ := set $tls "client" (dict "ca.crt" (b64enc $ca.Cert) "tls.crt" (b64enc $cli.Cert) "tls.key" (b64enc $cli.Key)) -}}
{{- end -}}
{{- $_ := set .Values "_netfenceEtcdTLS" $tls -}}
{{- end -}}
{{- end -}}

{{/* Whether the chart generates (and owns) the bundled etcd's Secrets (method helm). */}}
{{- define "netfence.etcd.generateTLS" -}}
{{- if and (not .Values.etcd.external.enabled) (eq (include "netfence.etcd.tlsMethod" .) "helm") -}}true{{- end -}}
{{- end -}}

{{/* Whether cert-manager issues the bundled etcd's certificates (method certManager). */}}
{{- define "netfence.etcd.certManager" -}}
{{- if and (not .Values.etcd.external.enabled) (eq (include "netfence.etcd.tlsMethod" .) "certManager") -}}true{{- end -}}
{{- end -}}

{{/* DNS names of the bundled etcd's server/peer certificate (the client Service and every member). */}}
{{- define "netfence.etcd.dnsNames" -}}
{{- $ns := .Release.Namespace -}}
{{- $full := include "netfence.etcd.fullname" . -}}
{{- $hl := include "netfence.etcd.headless" . -}}
{{- $d := .Values.clusterDomain -}}
{{- $dns := list "localhost" $full (printf "%s.%s" $full $ns) (printf "%s.%s.svc" $full $ns) (printf "%s.%s.svc.%s" $full $ns $d) -}}
{{- $dns = concat $dns (list (printf "*.%s" $hl) (printf "*.%s.%s" $hl $ns) (printf "*.%s.%s.svc" $hl $ns) (printf "*.%s.%s.svc.%s" $hl $ns $d)) -}}
{{- toJson $dns -}}
{{- end -}}

{{/* Priority -------------------------------------------------------------- */}}

{{/* The priority classes of the chart's pods, sorted, as a JSON list. */}}
{{- define "netfence.priorityClasses" -}}
{{- $v := .Values -}}
{{- $names := list $v.agent.priorityClassName $v.controller.priorityClassName -}}
{{- if not $v.etcd.external.enabled -}}
{{- $names = append $names $v.etcd.priorityClassName -}}
{{- end -}}
{{- $names | compact | uniq | sortAlpha | toJson -}}
{{- end -}}
