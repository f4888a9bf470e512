/*
 * jpps_gsoap.c -- a JP primary storage for the tests and the benchmark,
 * served by gSOAP as the real JPPS is.
 *
 * test_all.py (GSoapJPPSPeer) generates the SOAP layer at test time from
 * testdata/wsdl/JobProvenancePS.wsdl with wsdl2h -c and soapcpp2 -c -S,
 * and builds this file against it; nothing generated is kept.  This file
 * holds the JPPS behaviour the importer meets:
 *
 *   RegisterJob       stores the job in memory; a second registration of
 *                     the same job is the fault EEXIST "Job already
 *                     registered"
 *   StartUpload       ENOENT for an unknown job or file class, EEXIST
 *                     while a file of that class is uploading or once it
 *                     is committed, else a destination under DESTBASE
 *                     and commitBefore = now + 300 s
 *   CommitUpload      ENOENT when no such upload is in progress
 *   GetJobAttributes  ENOENT for an unknown job, else the regtime
 *
 * Faults carry the gLite genericFault detail as the real JPPS (gSOAP
 * 2.7.9 and later) writes it: <fault xsi:type="jptype:genericFault">.
 * Requests are parsed in SOAP_XML_STRICT mode, so a request that does
 * not follow the WSDL (element order, required elements, namespaces) is
 * refused: the second, independent check of the importer's wire format.
 *
 * HTTPS only, a client certificate required and verified against the CA
 * directory (RFC 3820 proxies accepted); HTTP/1.1 keep-alive, gSOAP's
 * stock limit of 100 requests per connection; a thread per connection.
 *
 * Usage: jpps_gsoap CERT KEY CADIR DESTBASE [LOG]
 * Listens on a free port of 127.0.0.1 and prints it on standard output.
 * LOG, when given, gets a line per call: op, result (ok or an errno),
 * client identity and the request's fields, tab-separated.
 */

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include "soapH.h"
#include "JobProvenancePS.nsmap"

#define UPLOAD_DEADLINE 300     /* s: an unfinished upload is forgotten */
#define BUCKETS (1 << 18)       /* job table; chains stay short to 10^6 */
#define IDLE_TIMEOUT 60         /* s: an idle keep-alive connection ends */

struct file {
	struct file *next;
	char *name;             /* "lb", "sandbox.x" ...: the class's file */
	char *destination;
	int committed;
	time_t deadline;        /* of an upload not committed */
};

struct job {
	struct job *next;
	char *unique;           /* the jobid's last path component */
	char *jobid, *owner;
	time_t regtime;
	struct file *files;
};

static const char *classes[][2] = {     /* a stock JPPS's file classes */
	{"urn:org.glite.jp.primary:lb", "lb"},
	{"urn:org.glite.jp.primary:isb", "sandbox"},
	{"urn:org.glite.jp.primary:classad", "classad"},
};

static struct job *table[BUCKETS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static const char *dest_base;
static FILE *logfile;

/* The client's identity, taken once per connection (soap->user). */
struct session {
	char identity[512];
};

static unsigned hash(const char *s)
{
	unsigned h = 5381;
	while (*s)
		h = h * 33 + (unsigned char)*s++;
	return h & (BUCKETS - 1);
}

/* The unique part of a jobid, malloc'ed, or NULL when it has no '/'. */
static char *unique_of(const char *jobid)
{
	const char *slash = jobid ? strrchr(jobid, '/') : NULL;
	if (!slash)
		return NULL;
	return strndup(slash + 1, strcspn(slash + 1, "?"));
}

static struct job *find_job(const char *unique)
{
	struct job *j;
	for (j = table[hash(unique)]; j; j = j->next)
		if (!strcmp(j->unique, unique))
			return j;
	return NULL;
}

static void log_call(struct soap *soap, const char *op, int code,
		     const char *a, const char *b, const char *c)
{
	struct session *s = soap->user;
	if (!logfile)
		return;
	fprintf(logfile, "%s\t%s%.0d\t%s\t%s\t%s\t%s\n", op,
		code ? "" : "ok", code, s ? s->identity : "",
		a ? a : "-", b ? b : "-", c ? c : "-");
}

/* A SOAP-ENV:Server fault with a genericFault chain of one or two. */
static int jp_fault(struct soap *soap, int code, const char *source,
		    const char *description, const char *reason_source,
		    const char *reason_description)
{
	struct SOAP_ENV__Detail *detail;
	struct jptype__genericFault *f, *r = NULL;

	soap_receiver_fault(soap, "Oh, shit!", NULL);
	if (reason_source) {
		r = soap_new_jptype__genericFault(soap, -1);
		r->source = soap_strdup(soap, reason_source);
		r->code = code;
		r->text = soap_strdup(soap, strerror(code));
		r->description = soap_strdup(soap, reason_description);
	}
	f = soap_new_jptype__genericFault(soap, -1);
	f->source = soap_strdup(soap, source);
	f->code = code;
	f->text = soap_strdup(soap, strerror(code));
	f->description = soap_strdup(soap, description);
	f->reason = r;
	detail = soap_new_SOAP_ENV__Detail(soap, -1);
	detail->__type = SOAP_TYPE_jptype__genericFault;
	detail->fault = f;
	soap->fault->detail = detail;
	return SOAP_FAULT;
}

int __jp__RegisterJob(struct soap *soap, struct _jpelem__RegisterJob *req,
		      struct _jpelem__RegisterJobResponse *resp)
{
	const char *src = "glite_jppsbe_register_job";
	char *unique = unique_of(req->job);
	struct job *j;
	unsigned h;

	(void)resp;
	if (!unique) {
		log_call(soap, "RegisterJob", EINVAL, req->job, req->owner, 0);
		return jp_fault(soap, EINVAL, src, "Malformed jobid", 0, 0);
	}
	pthread_mutex_lock(&lock);
	if (find_job(unique)) {
		log_call(soap, "RegisterJob", EEXIST, req->job, req->owner, 0);
		pthread_mutex_unlock(&lock);
		free(unique);
		return jp_fault(soap, EEXIST, src, "Job already registered",
				0, 0);
	}
	j = calloc(1, sizeof *j);
	j->unique = unique;
	j->jobid = strdup(req->job);
	j->owner = strdup(req->owner ? req->owner : "");
	j->regtime = time(NULL);
	h = hash(unique);
	j->next = table[h];
	table[h] = j;
	log_call(soap, "RegisterJob", 0, req->job, req->owner, 0);
	pthread_mutex_unlock(&lock);
	return SOAP_OK;
}

int __jp__StartUpload(struct soap *soap, struct _jpelem__StartUpload *req,
		      struct _jpelem__StartUploadResponse *resp)
{
	const char *src = "glite_jppsbe_start_upload", *shortname = NULL;
	char *unique = unique_of(req->job), name[1024], dest[4096];
	struct file *f, **fp;
	struct job *j;
	time_t now = time(NULL);
	size_t i;
	int code = 0;

	for (i = 0; i < sizeof classes / sizeof classes[0]; i++)
		if (req->class_ && !strcmp(req->class_, classes[i][0]))
			shortname = classes[i][1];
	snprintf(name, sizeof name, "%s%s%s", shortname ? shortname : "",
		 req->name ? "." : "", req->name ? req->name : "");
	pthread_mutex_lock(&lock);
	j = unique ? find_job(unique) : NULL;
	if (!shortname || !j)
		code = ENOENT;
	else {
		for (fp = &j->files; (f = *fp);) {
			if (!f->committed && f->deadline < now) {
				*fp = f->next;      /* expired: forgotten */
				free(f->name);
				free(f->destination);
				free(f);
			} else if (!strcmp(f->name, name)) {
				code = EEXIST;
				break;
			} else
				fp = &f->next;
		}
	}
	log_call(soap, "StartUpload", code, req->job, req->class_,
		 req->name ? req->name : "(nil)");
	if (code) {
		pthread_mutex_unlock(&lock);
		free(unique);
		return jp_fault(soap, code, src, code == EEXIST ?
				"File already stored or upload in progress" :
				!shortname ? "unknown file class" :
				"No such job registered", 0, 0);
	}
	snprintf(dest, sizeof dest, "%s/data/%s/%s", dest_base, j->unique,
		 name);
	f = calloc(1, sizeof *f);
	f->name = strdup(name);
	f->destination = strdup(dest);
	f->deadline = now + UPLOAD_DEADLINE;
	f->next = j->files;
	j->files = f;
	pthread_mutex_unlock(&lock);
	free(unique);
	resp->destination = soap_strdup(soap, dest);
	resp->commitBefore = now + UPLOAD_DEADLINE;
	return SOAP_OK;
}

int __jp__CommitUpload(struct soap *soap, struct _jpelem__CommitUpload *req,
		       struct _jpelem__CommitUploadResponse *resp)
{
	/* .../data/UNIQUE/NAME: the job is the second last component. */
	const char *d = req->destination ? req->destination : "";
	const char *last = strrchr(d, '/'), *first = last;
	struct file *f = NULL;
	struct job *j = NULL;
	char *unique;

	(void)resp;
	while (first && first > d && first[-1] != '/')
		first--;
	pthread_mutex_lock(&lock);
	if (last && first > d) {
		unique = strndup(first, last - first);
		j = find_job(unique);
		free(unique);
	}
	for (f = j ? j->files : NULL; f; f = f->next)
		if (!f->committed && f->deadline >= time(NULL) &&
		    !strcmp(f->destination, d))
			break;
	if (f)
		f->committed = 1;
	log_call(soap, "CommitUpload", f ? 0 : ENOENT, d, 0, 0);
	pthread_mutex_unlock(&lock);
	if (!f)
		return jp_fault(soap, ENOENT, "glite_jppsbe_commit_upload",
				"No such upload in progress", 0, 0);
	return SOAP_OK;
}

int __jp__GetJobAttributes(struct soap *soap,
			   struct _jpelem__GetJobAttributes *req,
			   struct _jpelem__GetJobAttributesResponse *resp)
{
	char *unique = unique_of(req->jobid), value[32];
	struct job *j;
	time_t regtime = 0;
	int i;

	pthread_mutex_lock(&lock);
	j = unique ? find_job(unique) : NULL;
	if (j)
		regtime = j->regtime;
	log_call(soap, "GetJobAttributes", j ? 0 : ENOENT, req->jobid, 0, 0);
	pthread_mutex_unlock(&lock);
	free(unique);
	if (!j)
		return jp_fault(soap, ENOENT, "glite_jpps_get_attrs",
				"Cannot retrieve job info", "get_job_info",
				"No records for this job");
	snprintf(value, sizeof value, "%ld", (long)regtime);
	resp->__sizeattrValues = req->__sizeattributes;
	resp->attrValues = soap_new_jptype__attrValue(soap,
						      req->__sizeattributes);
	for (i = 0; i < req->__sizeattributes; i++) {
		struct jptype__attrValue *v = &resp->attrValues[i];
		v->name = req->attributes[i];
		v->value = soap_new_jptype__stringOrBlob(soap, -1);
		v->value->__union_stringOrBlob =
			SOAP_UNION__jptype__union_stringOrBlob_string;
		v->value->union_stringOrBlob.string = soap_strdup(soap, value);
		v->timestamp = regtime;
		v->origin = jptype__attrOrig__SYSTEM;
	}
	return SOAP_OK;
}

/* One connection: the TLS handshake, then requests until it closes. */
static void *serve(void *arg)
{
	struct soap *soap = arg;
	struct session session = {""};
	X509 *peer;

	soap->user = &session;
	if (soap_ssl_accept(soap) == SOAP_OK) {
		peer = SSL_get_peer_certificate(soap->ssl);
		if (peer) {
			X509_NAME_oneline(X509_get_subject_name(peer),
					  session.identity,
					  sizeof session.identity);
			X509_free(peer);
		}
		soap_serve(soap);
	}
	soap_destroy(soap);
	soap_end(soap);
	soap_free(soap);
	return NULL;
}

int main(int argc, char **argv)
{
	struct soap *soap;
	struct sockaddr_in addr;
	socklen_t len = sizeof addr;
	pthread_attr_t attr;
	pthread_t thread;

	if (argc < 5 || argc > 6) {
		fprintf(stderr, "usage: %s CERT KEY CADIR DESTBASE [LOG]\n",
			argv[0]);
		return 2;
	}
	dest_base = argv[4];
	if (argc == 6) {
		logfile = fopen(argv[5], "a");
		if (!logfile) {
			perror(argv[5]);
			return 1;
		}
		setvbuf(logfile, NULL, _IOLBF, 0);  /* tests read it live */
	}
	signal(SIGPIPE, SIG_IGN);
	soap_ssl_init();
	soap = soap_new2(SOAP_IO_KEEPALIVE | SOAP_XML_STRICT,
			 SOAP_IO_KEEPALIVE);
	soap->bind_flags = SO_REUSEADDR;
	soap->recv_timeout = soap->send_timeout = IDLE_TIMEOUT;
	/* The key file is given as the certificate's key (soap->keyid is
	 * not in every build): load both into the context ourselves. */
	if (soap_ssl_server_context(soap,
				    SOAP_SSL_REQUIRE_CLIENT_AUTHENTICATION |
				    SOAP_TLSv1_2 | SOAP_TLSv1_3,
				    NULL, NULL, NULL, argv[3], NULL, NULL,
				    "jpps_gsoap") ||
	    SSL_CTX_use_certificate_chain_file(soap->ctx, argv[1]) != 1 ||
	    SSL_CTX_use_PrivateKey_file(soap->ctx, argv[2],
					SSL_FILETYPE_PEM) != 1) {
		soap_print_fault(soap, stderr);
		fprintf(stderr, "jpps_gsoap: cannot set up TLS with %s, %s\n",
			argv[1], argv[2]);
		return 1;
	}
	/* Grid clients present RFC 3820 proxy certificates. */
	X509_VERIFY_PARAM_set_flags(SSL_CTX_get0_param(soap->ctx),
				    X509_V_FLAG_ALLOW_PROXY_CERTS);
	if (!soap_valid_socket(soap_bind(soap, "127.0.0.1", 0, 100)) ||
	    getsockname(soap->master, (struct sockaddr *)&addr, &len)) {
		soap_print_fault(soap, stderr);
		return 1;
	}
	printf("%d\n", ntohs(addr.sin_port));
	fflush(stdout);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	for (;;) {
		struct soap *copy;
		if (!soap_valid_socket(soap_accept(soap)))
			continue;
		copy = soap_copy(soap);
		if (!copy || pthread_create(&thread, &attr, serve, copy)) {
			soap_force_closesock(soap);
			if (copy)
				soap_free(copy);
		}
	}
}
