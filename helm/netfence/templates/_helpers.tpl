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
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "netfence.chart" .ctx }}
{{- end -}}

{{/* Images ---------------------------------------------------------------- */}}

{{/* Call with (dict "ctx" $ "image" .Values.controller.image). */}}
{{- define "netfence.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
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
{{- default (printf "%s-client-tls" (include "netfence.etcd.fullname" .)) .Values.etcd.tls.existingClientSecret -}}
{{- end -}}
{{- end -}}

{{- define "netfence.etcd.serverSecret" -}}
{{- default (printf "%s-server-tls" (include "netfence.etcd.fullname" .)) .Values.etcd.tls.existingSecret -}}
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
{{- $hl := include "netfence.etcd.headless" . -}}
{{- $server := (lookup "v1" "Secret" $ns (printf "%s-server-tls" $full)) | default dict -}}
{{- $client := (lookup "v1" "Secret" $ns (printf "%s-client-tls" $full)) | default dict -}}
{{- $tls := dict -}}
{{- if and (index ($server.data | default dict) "tls.crt") (index ($client.data | default dict) "tls.crt") -}}
{{- $_ := set $tls "server" $server.data -}}
{{- $_ := set $tls "client" $client.data -}}
{{- else -}}
{{- $days := int .Values.etcd.tls.validityDays -}}
{{- $ca := genCA (printf "%s-ca" $full) $days -}}
{{- $d := .Values.clusterDomain -}}
{{- $dns := list "localhost" $full (printf "%s.%s" $full $ns) (printf "%s.%s.svc" $full $ns) (printf "%s.%s.svc.%s" $full $ns $d) -}}
{{- $dns = concat $dns (list (printf "*.%s" $hl) (printf "*.%s.%s" $hl $ns) (printf "*.%s.%s.svc" $hl $ns) (printf "*.%s.%s.svc.%s" $hl $ns $d)) -}}
{{- $srv := genSignedCert $full (list "127.0.0.1") $dns $days $ca -}}
{{- $cli := genSignedCert "netfence-client" nil nil $days $ca -}}
{{- $_ := set $tls "server" (dict "ca.crt" (b64enc $ca.Cert) "tls.crt" (b64enc $srv.Cert) "tls.key" (b64enc $srv.Key)) -}}
{{- $_ := set $tls "client" (dict "ca.crt" (b64enc $ca.Cert) "tls.crt" (b64enc $cli.Cert) "tls.key" (b64enc $cli.Key)) -}}
{{- end -}}
{{- $_ := set .Values "_netfenceEtcdTLS" $tls -}}
{{- end -}}
{{- end -}}

{{/* Whether the chart generates (and owns) the bundled etcd's Secrets. */}}
{{- define "netfence.etcd.generateTLS" -}}
{{- if and (not .Values.etcd.external.enabled) (not .Values.etcd.tls.existingSecret) (not .Values.etcd.tls.existingClientSecret) -}}true{{- end -}}
{{- end -}}
